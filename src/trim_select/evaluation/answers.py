"""Final-number extraction and exact match for math answers (GSM8K convention).

A generated solution ends ``#### N``; the number after the first ``####`` is the prediction
("strict" match in lm-evaluation-harness). Without a ``####`` the last number in the text is
taken ("flexible" match). Numbers compare by value: ``1,715`` = ``1715``, ``24.0`` = ``24``,
``-3`` = ``−3`` (Unicode minus), ``$8.50`` = ``8.5``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# a thousands-grouped integer (1,234,567) or a plain one, optional decimals; sign handled apart
# a sign counts only when it does not follow a word character ("10-5" is 10 and 5, "= -5" is -5)
_NUMBER = re.compile(r"(?:(?<![\w.])([-−]))?(?<![\d.])((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_MARKER = re.compile(r"####\s*")


def extract_number(text: str) -> str | None:
    """The predicted final number of a solution as a plain string (``'-1234.5'``), or ``None``.

    The number right after the first ``####`` wins; otherwise the last number in ``text``.
    Grouping commas are removed; the sign is kept; the value is not rounded.
    """
    marker = _MARKER.search(text)
    if marker is not None:
        m = _NUMBER.match(text, marker.end()) or _NUMBER.search(text[marker.end():marker.end() + 40])
        if m is not None:
            return _plain(m.group(1), m.group(2))
    found = _NUMBER.findall(text)
    if not found:
        return None
    sign, digits = found[-1]
    return _plain(sign, digits)


def _plain(sign: str, digits: str) -> str:
    digits = digits.replace(",", "")
    if digits.startswith("."):
        digits = "0" + digits
    return ("-" if sign else "") + digits


def to_decimal(value: str | int | float | None) -> Decimal | None:
    """A number string (commas, ``$``, trailing ``.``, Unicode minus allowed) as a ``Decimal``."""
    if value is None:
        return None
    text = str(value).strip().replace(",", "").replace("$", "").replace("−", "-").replace("–", "-")
    text = text.rstrip(".")
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def numbers_match(predicted: str | None, gold: str | int | float) -> bool:
    """Exact match by value: ``'24.0'`` matches ``'24'``; ``None`` (nothing parsed) never matches."""
    p, g = to_decimal(predicted), to_decimal(gold)
    return p is not None and g is not None and p == g


def exact_match(generation: str, gold: str | int | float) -> bool:
    """Whether the final number of ``generation`` equals ``gold`` (see :func:`extract_number`)."""
    return numbers_match(extract_number(generation), gold)
