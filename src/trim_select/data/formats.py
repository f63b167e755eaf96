"""Row formats: detect one row's format by its keys and parse it into :class:`Message` turns.

``messages`` (open-instruct / LESS), ``sharegpt`` (``conversations`` with ``from``/``value``),
``alpaca`` (``instruction``/``input``/``output``), ``prompt_response`` (``prompt`` with
``response`` or ``completion``) and ``text``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .records import FieldError, Message, Record

FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt_response", "text")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


def detect_format(row: Mapping[str, Any]) -> str:
    """The format of one row, by its keys; raises ``KeyError`` naming the keys when unknown."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and ("response" in row or "completion" in row):
        return "prompt_response"
    if "text" in row:
        return "text"
    raise KeyError(
        "unknown record format: expected one of 'messages', 'conversations', "
        "'instruction'+'output', 'prompt'+'response'/'completion', 'text'; got keys "
        + ", ".join(repr(k) for k in list(row)[:10])
    )


def _string(row: Mapping[str, Any], key: str, *, where: str | None = None, allow_empty: bool = False) -> str:
    name = where or key
    if key not in row or row[key] is None:
        raise FieldError(name, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FieldError(name, "empty")
    return value


def _turns(row: Mapping[str, Any], key: str, role_key: str, content_key: str, roles: Mapping[str, str]):
    turns = row.get(key)
    if not isinstance(turns, list):
        raise FieldError(key, f"expected a list of turns, got {type(turns).__name__}")
    if not turns:
        raise FieldError(key, "empty conversation")
    out = []
    for k, turn in enumerate(turns):
        where = f"{key}[{k}]"
        if not isinstance(turn, Mapping):
            raise FieldError(where, f"expected an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise FieldError(f"{where}.{role_key}", "missing" if role is None else "expected a string")
        norm = roles.get(role.lower())
        if norm is None:
            raise FieldError(f"{where}.{role_key}", f"unknown role {role!r} (expected {sorted(set(roles))})")
        out.append(Message(norm, _string(turn, content_key, where=f"{where}.{content_key}")))
    if not any(m.role in ("user", "assistant") for m in out):
        raise FieldError(key, "no user or assistant turn")
    return tuple(out)


def parse_row(row: Any, fmt: str) -> tuple[Message, ...]:
    """Messages of one row in format ``fmt``. Raises ``FieldError`` on bad input."""
    if not isinstance(row, Mapping):
        raise FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
    if fmt == "messages":
        return _turns(row, "messages", "role", "content", {r: r for r in ROLES})
    if fmt == "sharegpt":
        return _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)
    if fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise FieldError("input", f"expected a string, got {type(extra).__name__}")
        prompt = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        return (Message("user", prompt), Message("assistant", _string(row, "output")))
    if fmt == "prompt_response":
        key = "response" if "response" in row else "completion"
        return (Message("user", _string(row, "prompt")), Message("assistant", _string(row, key)))
    if fmt == "text":
        return (Message("text", _string(row, "text")),)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")



def parse_raw_row(path: str | Path, index: int, line: int, raw: bytes, fmt: str) -> Record:
    """One raw JSON Lines row (as :func:`read_records` numbers it) validated as :func:`read_records`
    does; raises :class:`DataError` naming file, line and field (used by engines reading by chunk)."""
    try:
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise FieldError("<line>", f"not valid UTF-8 at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise FieldError("<line>", f"malformed JSON ({exc.msg} at column {exc.colno})") from None
        messages = parse_row(row, fmt)
    except FieldError as exc:
        raise exc.to_data_error(path, line) from None
    rid = row.get("id")
    return Record(index=index, line=line, id=str(index) if rid is None else str(rid), messages=messages,
                  raw=raw, fields=row)
