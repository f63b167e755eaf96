"""Task folders (``val.jsonl``, ``dev.jsonl``, ``test.jsonl``) and the prompts built from them.

The layout is the benchmark's (``shared/bench/README.md``)::

    multiple choice: {"id", "question", "choices": [...], "answer_index": k}
    math:            {"id", "question", "answer": "<final number>", "solution": "<steps ... #### N>"}

The kind is read off the test rows (``choices`` -> multiple choice, ``answer``/``solution`` ->
math), so any folder in that layout works. Prompts are chat turns: ``k`` exemplars from
``dev.jsonl`` as user/assistant pairs, then the test question as the last user turn. A multiple
choice question is shown as in the pool and ``val.jsonl`` (question, blank line, ``Options:`` and
one ``- choice`` line per option) and the answer is the option's text; a math question is shown
as is and its answer is the worked solution.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..data import DataError, Message

Kind = Literal["mc", "math"]
KINDS: tuple[str, ...] = ("mc", "math")
DEFAULT_SHOTS: dict[str, int] = {"mc": 5, "math": 4}


@dataclass(frozen=True)
class TaskRow:
    """One test or dev row. ``choices``/``answer_index`` for mc; ``answer``/``solution`` for math."""

    id: str
    question: str
    choices: tuple[str, ...] = ()
    answer_index: int = -1
    answer: str = ""
    solution: str = ""


@dataclass(frozen=True)
class Task:
    """A task folder read into memory."""

    name: str
    path: str
    kind: Kind
    test: tuple[TaskRow, ...]
    dev: tuple[TaskRow, ...]

    def subset(self, limit: int | None, seed: int = 0) -> tuple[TaskRow, ...]:
        """The evaluation rows: all, or a seeded random ``limit`` of them in file order."""
        return subset_rows(self.test, limit, seed)


def detect_kind(row: Mapping[str, Any]) -> Kind:
    """``mc`` when a row has ``choices``; ``math`` when it has ``answer`` or ``solution``."""
    if "choices" in row:
        return "mc"
    if "answer" in row or "solution" in row:
        return "math"
    raise KeyError("cannot tell the task kind: a test row needs 'choices' (multiple choice) or "
                   "'answer'/'solution' (math); got keys " + ", ".join(repr(k) for k in list(row)[:10]))


def parse_task_row(raw: Mapping[str, Any], kind: Kind, path: str | Path = "<row>",
                   line: int | None = None) -> TaskRow:
    """Validate one test/dev row of ``kind``; errors name the file, line and field."""
    path = Path(path)
    def need(key: str, typ: type) -> Any:
        if key not in raw or raw[key] is None:
            raise DataError(path, line, key, "missing")
        if not isinstance(raw[key], typ):
            raise DataError(path, line, key, f"expected {typ.__name__}, got {type(raw[key]).__name__}")
        return raw[key]

    rid = str(raw.get("id", f"{path.stem}/{line}"))
    question = need("question", str)
    if kind == "mc":
        choices = need("choices", list)
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError(path, line, "choices", "expected at least two non-empty strings")
        idx = need("answer_index", int)
        if not 0 <= idx < len(choices):
            raise DataError(path, line, "answer_index", f"{idx} is not an index of {len(choices)} choices")
        return TaskRow(rid, question, tuple(choices), idx)
    answer = raw.get("answer")
    solution = raw.get("solution")
    if answer is None and isinstance(solution, str):
        from .answers import extract_number

        answer = extract_number(solution)
    if answer is None:
        raise DataError(path, line, "answer", "missing (and no '#### N' in 'solution')")
    answer = str(answer)
    if solution is None:
        solution = f"#### {answer}"
    if not isinstance(solution, str):
        raise DataError(path, line, "solution", f"expected str, got {type(solution).__name__}")
    return TaskRow(rid, question, (), -1, answer, solution)


def read_rows(path: str | Path, kind: Kind | None = None) -> tuple[Kind, tuple[TaskRow, ...]]:
    """Rows of a test/dev jsonl file and its kind (detected from the first row unless given)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    rows: list[TaskRow] = []
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(path, line, None, f"malformed JSON ({exc.msg})") from None
            if not isinstance(raw, dict):
                raise DataError(path, line, None, "expected a JSON object")
            if kind is None:
                kind = detect_kind(raw)
            rows.append(parse_task_row(raw, kind, path, line))
    if kind is None:
        raise DataError(path, None, None, "no rows")
    return kind, tuple(rows)


def load_task(path: str | Path) -> Task:
    """Read ``test.jsonl`` (required) and ``dev.jsonl`` (optional; no exemplars without it)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"task folder {path} not found")
    kind, test = read_rows(path / "test.jsonl")
    dev: tuple[TaskRow, ...] = ()
    if (path / "dev.jsonl").exists():
        _, dev = read_rows(path / "dev.jsonl", kind)
    return Task(name=path.name, path=str(path.resolve()), kind=kind, test=test, dev=dev)


def subset_rows(rows: Sequence[TaskRow], limit: int | None, seed: int = 0) -> tuple[TaskRow, ...]:
    """All rows, or ``limit`` of them drawn with ``numpy.random.default_rng(seed)``, in file order."""
    if limit is None or limit >= len(rows):
        return tuple(rows)
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
    return tuple(rows[int(i)] for i in pick)


def question_text(row: TaskRow, kind: Kind) -> str:
    """The user turn: the question, plus the ``Options:`` block for multiple choice."""
    if kind == "mc":
        return row.question + "\n\nOptions:\n" + "\n".join(f"- {c}" for c in row.choices)
    return row.question


def gold_text(row: TaskRow, kind: Kind) -> str:
    """The gold assistant turn: the correct option's text, or the worked solution."""
    return row.choices[row.answer_index] if kind == "mc" else row.solution


def prompt_messages(row: TaskRow, kind: Kind, exemplars: Sequence[TaskRow]) -> list[Message]:
    """k-shot chat: each exemplar as a user/assistant pair, then ``row`` as the last user turn."""
    msgs: list[Message] = []
    for ex in exemplars:
        msgs.append(Message("user", question_text(ex, kind)))
        msgs.append(Message("assistant", gold_text(ex, kind)))
    msgs.append(Message("user", question_text(row, kind)))
    return msgs
