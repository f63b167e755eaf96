"""Readers: stream validated :class:`Record` objects from ``.jsonl``, ``.jsonl.gz``, ``.json``,
``.parquet`` or a folder written by ``datasets.Dataset.save_to_disk``."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .formats import FORMATS, detect_format, parse_row
from .records import DataError, FieldError, ReadStats, Record


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


def _row_format(row: Any, err: str | None, fmt: str | None) -> str:
    """``fmt``, or the format detected from ``row`` when none is fixed yet (the first record fixes
    it); raises ``FieldError`` for a line that did not parse or a row of no known format."""
    if err is not None:
        raise FieldError("<line>", err)
    if fmt is not None:
        return fmt
    if not isinstance(row, Mapping):
        raise FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
    try:
        return detect_format(row)
    except KeyError as exc:
        raise FieldError("<row>", exc.args[0]) from None


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
            fmt = _row_format(row, err, fmt)
            messages = parse_row(row, fmt)
            rid = row.get("id")
            rid = str(index) if rid is None else str(rid)
        except FieldError as exc:
            error = exc.to_data_error(path, line)
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
