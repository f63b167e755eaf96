"""Records -> token sequences: input formats, rendering and scope masks.

Data flows one way: a pool or target *file* is read into :class:`Record` objects (one per row,
validated, with the original bytes kept for verbatim copy-through), each record is rendered with
the model's chat template into ``input_ids`` plus the masks docs/SPEC.md defines:

- ``special_mask``: token id is one of ``tokenizer.all_special_ids``;
- ``scope_mask``: token lies in the chosen scope (``all``, ``prompt`` = user turns,
  ``response`` = assistant turns).

Supported formats (auto-detected from the first record, ``format=`` overrides):
``messages`` (open-instruct / LESS), ``sharegpt`` (``conversations`` with ``from``/``value``),
``alpaca`` (``instruction``/``input``/``output``), ``prompt_response`` (``prompt`` with
``response`` or ``completion``) and ``text``. Files: ``.jsonl``, ``.jsonl.gz``, ``.json``,
``.parquet`` or a folder written by ``datasets.Dataset.save_to_disk``.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import RenderConfig

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
PLAIN_TEMPLATE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


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


# --------------------------------------------------------------------------------------------
# Format detection and parsing
# --------------------------------------------------------------------------------------------


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
        raise _FieldError(name, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise _FieldError(name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _FieldError(name, "empty")
    return value


class _FieldError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _turns(row: Mapping[str, Any], key: str, role_key: str, content_key: str, roles: Mapping[str, str]):
    turns = row.get(key)
    if not isinstance(turns, list):
        raise _FieldError(key, f"expected a list of turns, got {type(turns).__name__}")
    if not turns:
        raise _FieldError(key, "empty conversation")
    out = []
    for k, turn in enumerate(turns):
        where = f"{key}[{k}]"
        if not isinstance(turn, Mapping):
            raise _FieldError(where, f"expected an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise _FieldError(f"{where}.{role_key}", "missing" if role is None else "expected a string")
        norm = roles.get(role.lower())
        if norm is None:
            raise _FieldError(f"{where}.{role_key}", f"unknown role {role!r} (expected {sorted(set(roles))})")
        out.append(Message(norm, _string(turn, content_key, where=f"{where}.{content_key}")))
    if not any(m.role in ("user", "assistant") for m in out):
        raise _FieldError(key, "no user or assistant turn")
    return tuple(out)


def parse_row(row: Any, fmt: str) -> tuple[Message, ...]:
    """Messages of one row in format ``fmt``. Raises ``_FieldError`` on bad input."""
    if not isinstance(row, Mapping):
        raise _FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
    if fmt == "messages":
        return _turns(row, "messages", "role", "content", {r: r for r in ROLES})
    if fmt == "sharegpt":
        return _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)
    if fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _FieldError("input", f"expected a string, got {type(extra).__name__}")
        prompt = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        return (Message("user", prompt), Message("assistant", _string(row, "output")))
    if fmt == "prompt_response":
        key = "response" if "response" in row else "completion"
        return (Message("user", _string(row, "prompt")), Message("assistant", _string(row, key)))
    if fmt == "text":
        return (Message("text", _string(row, "text")),)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[int, bytes | None, Any, str | None]]:
    """(line number, raw bytes, parsed object or None, error) per line; blank lines as raw None."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            raw = raw.rstrip(b"\r\n")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is tolerated, not data
            if not raw.strip():
                yield lineno, None, None, None
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, raw, None, f"not valid UTF-8 at byte {exc.start}"
                continue
            try:
                yield lineno, raw, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield lineno, raw, None, f"malformed JSON ({exc.msg} at column {exc.colno})"


def _iter_table(rows: Iterable[Any]) -> Iterator[tuple[int, bytes | None, Any, str | None]]:
    for k, row in enumerate(rows, start=1):
        raw = json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")
        yield k, raw, row, None


def _raw_rows(path: Path) -> Iterator[tuple[int, bytes | None, Any, str | None]]:
    name = path.name.lower()
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            raise DataError(path, None, None, "folder is not a saved Hugging Face dataset (no state.json)")
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(path, None, None, f"a DatasetDict with splits {list(ds)}; point at one split")
        yield from _iter_table(ds)
    elif name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".ndjson"):
        yield from _iter_jsonl(path)
    elif name.endswith(".json"):
        with open(path, "rb") as fh:
            try:
                data = json.loads(fh.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                # a .json file holding JSON Lines
                yield from _iter_jsonl(path)
                return
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise DataError(path, None, None, "a .json file must hold a list of records")
        yield from _iter_table(data)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        line = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                line += 1
                yield line, json.dumps(row, ensure_ascii=False, default=str).encode("utf-8"), row, None
    else:
        raise DataError(path, None, None, "unsupported file type (use .jsonl, .jsonl.gz, .json, .parquet "
                        "or a saved datasets folder)")


def read_records(
    path: str | Path,
    format: str | None = None,
    *,
    skip_invalid: bool = False,
    stats: ReadStats | None = None,
    on_reject: Any = None,
    track_ids: bool = True,
) -> Iterator[Record]:
    """Stream validated records from ``path``.

    By default the first bad row raises :class:`DataError` (file, line, field). With
    ``skip_invalid=True`` bad rows are counted in ``stats`` and passed to ``on_reject(error, raw)``
    (e.g. a writer of ``rejected.jsonl``); nothing is dropped silently. ``track_ids=False`` skips
    the in-memory duplicate-id check (memory grows with the pool; callers with a scores table
    count duplicates from it instead).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if format is not None and format not in FORMATS:
        raise DataError(path, None, "--format", f"unknown format {format!r}; expected one of {FORMATS}")
    stats = stats if stats is not None else ReadStats()
    fmt = format
    seen_ids: set[str] = set()
    index = -1
    for line, raw, row, err in _raw_rows(path):
        if raw is None:
            stats.blank_lines += 1
            continue
        index += 1
        stats.rows += 1
        try:
            if err is not None:
                raise _FieldError("<line>", err)
            if fmt is None:
                if not isinstance(row, Mapping):
                    raise _FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
                try:
                    fmt = detect_format(row)
                except KeyError as exc:
                    raise _FieldError("<row>", exc.args[0]) from None
            messages = parse_row(row, fmt)
            rid = row.get("id")
            rid = str(index) if rid is None else str(rid)
        except _FieldError as exc:
            error = DataError(path, line, None if exc.field.startswith("<") else exc.field, exc.reason)
            if not skip_invalid:
                raise error from None
            stats.rejected += 1
            if on_reject is not None:
                on_reject(error, raw, index)
            continue
        if track_ids:
            if rid in seen_ids:
                stats.duplicate_ids += 1
                if len(stats.duplicate_examples) < 10:
                    stats.duplicate_examples.append(rid)
            seen_ids.add(rid)
        stats.records += 1
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        yield Record(index=index, line=line, id=rid, messages=messages, raw=raw, fields=row)


def load_records(path: str | Path, format: str | None = None, **kw: Any) -> list[Record]:
    """All records of a (small) file, e.g. a target set."""
    return list(read_records(path, format, **kw))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSequence:
    """A rendered example: what Stage I and II consume."""

    input_ids: np.ndarray  # int64 [T]
    scope_mask: np.ndarray  # bool [T]
    special_mask: np.ndarray  # bool [T]
    n_truncated: int = 0  # tokens cut by max_length

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    # mapping protocol, so a TokenSequence is accepted wherever the low-level API takes a mapping
    def keys(self) -> tuple[str, ...]:
        return ("input_ids", "scope_mask", "special_mask")

    def __getitem__(self, key: str) -> np.ndarray:
        return getattr(self, key)


class Renderer:
    """Turns messages into a :class:`TokenSequence` with the model's chat template.

    Scope masks are computed from character spans of each message's content inside the rendered
    text, mapped to tokens through the tokenizer's offsets, so multi-turn conversations mark every
    user and every assistant turn correctly whatever the template looks like.
    """

    def __init__(self, tokenizer: Any, config: RenderConfig = RenderConfig()):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("trim-select needs a fast (Rust) tokenizer for offset mapping")
        self.tokenizer = tokenizer
        self.config = config
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if config.chat_template is None else config.chat_template
        if self.use_chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self._skeletons: dict[tuple[str, ...], str] = {}  # placeholder rendering per role sequence

    # -- text with content spans ---------------------------------------------------------------
    def _template_text(self, messages: Sequence[Message]) -> str:
        if len(messages) == 1 and messages[0].role == "text":
            return messages[0].content
        if self.use_chat_template:
            conv = [{"role": m.role, "content": m.content} for m in messages]
            return self.tokenizer.apply_chat_template(conv, tokenize=False)
        bos = self.tokenizer.bos_token or ""
        eos = self.tokenizer.eos_token or ""
        return bos + "".join(PLAIN_TEMPLATE_HEADERS[m.role] + m.content + "\n" for m in messages) + eos

    def _text_and_spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int, str]]]:
        """The rendered text and the character span of every message's content in it.

        The template is rendered once with a unique placeholder per message, so content is located
        exactly (never inside the template's own tokens, e.g. an ``i`` inside ``<|im_start|>``);
        templates that trim content are handled by matching the stripped content.
        """
        text = self._template_text(messages)
        if len(messages) == 1 and messages[0].role == "text":
            return text, [(0, len(text), "text")]
        marks = [f"\ue000{k}\ue001" for k in range(len(messages))]
        roles = tuple(m.role for m in messages)
        skeleton = self._skeletons.get(roles)
        if skeleton is None:  # depends on the roles only; a content-dependent template fails the check below
            skeleton = self._template_text([Message(m.role, mark) for m, mark in zip(messages, marks, strict=True)])
            if len(self._skeletons) < 4096:
                self._skeletons[roles] = skeleton
        for strip in (False, True):
            spans, out, pos, length = [], [], 0, 0
            for m, mark in zip(messages, marks, strict=True):
                at = skeleton.find(mark, pos)
                if at < 0:
                    break
                out.append(skeleton[pos:at])
                length += at - pos
                content = m.content.strip() if strip else m.content
                spans.append((length, length + len(content), m.role))
                out.append(content)
                length += len(content)
                pos = at + len(mark)
            else:
                out.append(skeleton[pos:])
                if "".join(out) == text:
                    return text, spans
        # a template that rewrites content: fall back to locating it in order
        spans, cursor = [], 0
        for k, m in enumerate(messages):
            content = m.content if text.find(m.content, cursor) >= 0 else m.content.strip()
            start = text.find(content, cursor)
            if start < 0:
                raise ValueError(f"message {k} ({m.role}) not found verbatim in the rendered template")
            spans.append((start, start + len(content), m.role))
            cursor = start + len(content)
        return text, spans

    def render(self, messages: Sequence[Message]) -> TokenSequence:
        text, spans = self._text_and_spans(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return self._sequence(enc["input_ids"], enc["offset_mapping"], spans)

    def render_many(self, conversations: Sequence[Sequence[Message]]) -> list[TokenSequence]:
        """:meth:`render` of many conversations with one batch call of the (Rust) tokenizer."""
        if not conversations:
            return []
        rendered = [self._text_and_spans(m) for m in conversations]
        enc = self.tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        return [self._sequence(ids, offs, spans) for ids, offs, (_, spans)
                in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True)]

    def _sequence(self, input_ids: Sequence[int], offset_mapping: Sequence[Any],
                  spans: list[tuple[int, int, str]]) -> TokenSequence:
        cfg = self.config
        ids = np.asarray(input_ids, dtype=np.int64)
        offsets = np.asarray(offset_mapping, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        scope = np.zeros(len(ids), dtype=bool)
        for a, b, role in spans:
            if (
                cfg.scope == "all"
                or (cfg.scope == "prompt" and role == "user")
                or (cfg.scope == "response" and role in ("assistant", "text"))
            ):
                scope |= (starts < b) & (ends > a) & (ends > starts)
        if cfg.scope == "all" and cfg.score_template:
            scope[:] = True
        special = np.isin(ids, self.special_ids)
        n_trunc = max(0, len(ids) - cfg.max_length)
        if n_trunc:
            # scope-aware: a response-scope run keeps the end (the response), others the start
            keep = slice(n_trunc, None) if cfg.scope == "response" else slice(0, cfg.max_length)
            ids, scope, special = ids[keep], scope[keep], special[keep]
        return TokenSequence(ids, scope, special, n_trunc)

    def __call__(self, record: Record) -> TokenSequence:
        return self.render(record.messages)


def as_sequence(item: Mapping[str, Any] | TokenSequence) -> TokenSequence:
    """Normalise a low-level API input (mapping with ``input_ids`` and optional masks)."""
    if isinstance(item, TokenSequence):
        return item
    if "input_ids" not in item:
        raise KeyError("each example needs 'input_ids'")
    ids = np.asarray(item["input_ids"], dtype=np.int64).reshape(-1)
    n = ids.shape[0]
    scope = item.get("scope_mask")
    special = item.get("special_mask")
    scope = np.ones(n, dtype=bool) if scope is None else np.asarray(scope, dtype=bool).reshape(-1)
    special = np.zeros(n, dtype=bool) if special is None else np.asarray(special, dtype=bool).reshape(-1)
    if scope.shape[0] != n or special.shape[0] != n:
        raise ValueError(f"masks must have the length of input_ids ({n}); got {scope.shape[0]}, "
                         f"{special.shape[0]}")
    return TokenSequence(ids, scope, special)


def parse_budget(budget: str | int | float, n: int) -> int:
    """``'5%'`` -> round-half-up(0.05 * n); ``'100'``/``100`` -> 100; ``0.05`` -> fraction."""
    if isinstance(budget, str):
        text = budget.strip()
        if text.endswith("%"):
            frac = float(text[:-1]) / 100.0
            k = math.floor(frac * n + 0.5)
        elif "." in text:
            k = math.floor(float(text) * n + 0.5)
        else:
            k = int(text)
    elif isinstance(budget, float):
        k = math.floor(budget * n + 0.5)
    else:
        k = int(budget)
    if k < 0:
        raise ValueError(f"budget must be non-negative, got {budget!r}")
    if k > n:
        raise ValueError(f"budget {budget!r} = {k} examples is larger than the pool ({n} examples)")
    return k


def parse_raw_row(path: str | Path, index: int, line: int, raw: bytes, fmt: str) -> Record:
    """One raw JSON Lines row (as :func:`read_records` numbers it) validated as :func:`read_records`
    does; raises :class:`DataError` naming file, line and field (used by engines reading by chunk)."""
    try:
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _FieldError("<line>", f"not valid UTF-8 at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise _FieldError("<line>", f"malformed JSON ({exc.msg} at column {exc.colno})") from None
        messages = parse_row(row, fmt)
    except _FieldError as exc:
        raise DataError(path, line, None if exc.field.startswith("<") else exc.field, exc.reason) from None
    rid = row.get("id")
    return Record(index=index, line=line, id=str(index) if rid is None else str(rid), messages=messages,
                  raw=raw, fields=row)
