"""The types records flow in: :class:`Record` (one validated row), :class:`Message`, the reader's
:class:`ReadStats`, and :class:`DataError` naming file, line and field."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A record could not be read. Names the file, the line (1-based) and the field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, reason: str):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        where = f"{path}" + (f", line {line}" if line is not None else "")
        what = f" field {field!r}:" if field else ":"
        super().__init__(f"{where}{what} {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Ray workers)
        return (type(self), (self.path, self.line, self.field, self.reason))


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | text
    content: str


@dataclass(frozen=True)
class Record:
    """One validated row of an input file."""

    index: int  # 0-based position among the file's rows (rejected rows keep their number)
    line: int  # 1-based line (jsonl) or row number + 1 (other containers)
    id: str
    messages: tuple[Message, ...]
    raw: bytes  # the row exactly as read (jsonl) or its JSON serialisation (other containers)
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class ReadStats:
    """What a reader saw: every row is either a record or counted as rejected."""

    rows: int = 0
    records: int = 0
    rejected: int = 0
    blank_lines: int = 0
    duplicate_ids: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "records": self.records,
            "rejected": self.rejected,
            "blank_lines": self.blank_lines,
            "duplicate_ids": self.duplicate_ids,
            "duplicate_id_examples": self.duplicate_examples[:10],
            "formats": dict(self.formats),
        }



class FieldError(Exception):
    """A bad field inside one row; readers turn it into a :class:`DataError` with file and line."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason

    def to_data_error(self, path: Any, line: int | None) -> DataError:
        """The :class:`DataError` for this field at ``path``, ``line`` (``<row>``-style names dropped)."""
        return DataError(path, line, None if self.field.startswith("<") else self.field, self.reason)
