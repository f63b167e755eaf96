"""Test-set contamination of the pool: word 13-gram overlap (GPT-3 / open-instruct style).

Text is normalised (lower case, every run of non-alphanumeric characters to one space) and split
into words; a pool row's *overlap* with a task is the share of its word 13-grams that occur in
any test row of the task (question, options and gold answer). A row is flagged when that share is
at least ``threshold`` (default 0.5 of its n-grams, open-instruct's default). A row shorter than
``n`` words has no n-gram and is never flagged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..data import Record
from .tasks import Task, gold_text, question_text

_NON_WORD = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True)
class DecontaminationConfig:
    """n-gram length and the share of a row's n-grams that must occur in the test set."""

    n: int = 13
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words (punctuation and whitespace are separators)."""
    return _NON_WORD.sub(" ", text.lower()).split()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of word ``n``-grams of ``text`` after :func:`words`."""
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def task_ngrams(tasks: Iterable[Task], n: int) -> set[tuple[str, ...]]:
    """Every word n-gram of every test row (question + options, and the gold answer) of ``tasks``."""
    out: set[tuple[str, ...]] = set()
    for task in tasks:
        for row in task.test:
            out |= ngrams(question_text(row, task.kind) + "\n" + gold_text(row, task.kind), n)
    return out


def record_text(record: Record) -> str:
    """All message contents of a pool record, one per line."""
    return "\n".join(m.content for m in record.messages)


def contaminated(records: Sequence[Record], tasks: Sequence[Task],
                 config: DecontaminationConfig = DecontaminationConfig()) -> list[dict[str, Any]]:
    """Pool rows whose n-gram overlap with the tasks' test rows reaches the threshold.

    Each entry: ``index``, ``id``, ``overlap`` (share of the row's n-grams found), ``ngrams``
    (found / total).
    """
    test = task_ngrams(tasks, config.n)
    flagged = []
    for rec in records:
        grams = ngrams(record_text(rec), config.n)
        if not grams:
            continue
        hit = sum(g in test for g in grams)
        share = hit / len(grams)
        if hit and share >= config.threshold:
            flagged.append({"index": rec.index, "id": rec.id, "overlap": round(share, 4),
                            "ngrams": f"{hit}/{len(grams)}"})
    return flagged


def drop_contaminated(records: Sequence[Record], flagged: Sequence[dict[str, Any]]) -> list[Record]:
    """``records`` without the flagged ones (``--decontaminate``), in their order."""
    gone = {int(f["index"]) for f in flagged}
    return [r for r in records if r.index not in gone]
