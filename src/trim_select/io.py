"""Output IO, apart from the math: atomic files, the score-chunk writer with resume, coreset copy.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written output. Scores are written chunk by chunk (``DIR/parts/``); a chunk
file is the completion marker of its chunk, so a rerun recomputes only unfinished chunks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("index", "id", "score", "mean", "max", "coverage", "n_tokens", "n_scored", "n_unseen",
                 "n_truncated")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what a user expects of an output file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class InputChangedError(RuntimeError):
    """An input file's content differs from the one an output folder's results were computed from."""


_DIGESTS: dict[tuple[Any, ...], str] = {}  # stat signature -> digest: hash each input once per process
_HASH_BLOCK = 1 << 22


def _stat_signature(p: Path) -> tuple[Any, ...]:
    """What must stay equal for a memoised digest to be reused (size, mtime_ns, ctime_ns, inode)."""
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return ("dir", str(p), *((f.relative_to(p).as_posix(), *_stat_tuple(f)) for f in files))
    return ("file", str(p), *_stat_tuple(p))


def _stat_tuple(f: Path) -> tuple[int, int, int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def content_digest(path: str | Path) -> str:
    """xxh3-128 of a file's bytes, or of a folder's files (``save_to_disk``) in sorted relative-path
    order with each name and size hashed before its bytes. Memoised on the stat signature."""
    p = Path(path).resolve()
    sig = _stat_signature(p)
    if sig in _DIGESTS:
        return _DIGESTS[sig]
    h = xxhash.xxh3_128()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0" + f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                h.update(block)
    digest = h.hexdigest()
    _DIGESTS[sig] = digest
    return digest


def digest_entry(path: str | Path) -> tuple[tuple[Any, ...], str]:
    """(stat signature, digest) of ``path``, for :func:`remember_digest` in a worker process: the driver
    hashes once, a worker reuses it only while the file's stat signature is unchanged."""
    p = Path(path).resolve()
    return _stat_signature(p), content_digest(p)


def remember_digest(entry: tuple[tuple[Any, ...], str] | list[Any]) -> None:
    """Seed this process's digest memo with a :func:`digest_entry` from the driver."""
    sig, digest = entry
    _DIGESTS[_as_tuple(sig)] = digest


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def file_identity(path: str | Path) -> dict[str, Any]:
    """A file's or folder's resolved path, size in bytes and content digest (xxh3-128): the identity
    every cache and resume key uses, so a same-size edit is a different input."""
    p = Path(path).resolve()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return {"path": str(p), "bytes": size, "xxh3_128": content_digest(p)}


def check_unchanged(recorded: dict[str, Any], current: dict[str, Any], where: str | Path, *,
                    overwrite: bool = False) -> list[str]:
    """The one rule for changed inputs: for each role (``pool``, ``targets``) whose recorded file is
    the current path but whose digest or size differs, raise :class:`InputChangedError` naming the
    file and ``--overwrite``; with ``overwrite``, log one line and return the changed roles instead."""
    changed = []
    for role, new in current.items():
        old = recorded.get(role)
        if not isinstance(old, dict) or not isinstance(new, dict) or old.get("path") != new.get("path"):
            continue
        if "xxh3_128" not in old or (old["xxh3_128"], old.get("bytes")) == (new["xxh3_128"], new["bytes"]):
            continue
        what = (f"{role} file {new['path']} changed since the results in {where} were computed "
                f"(xxh3-128 {old['xxh3_128'][:12]}… -> {new['xxh3_128'][:12]}…, {old.get('bytes')} -> "
                f"{new['bytes']} bytes)")
        if not overwrite:
            raise InputChangedError(f"{what}; rerun with --overwrite to recompute what depends on it, "
                                    "or choose another --out")
        log.warning("%s: recomputing (--overwrite)", what)
        changed.append(role)
    return changed


CORE_PACKAGES: tuple[str, ...] = ("trim-select", "torch", "transformers", "peft", "safetensors", "tokenizers",
                                  "numpy", "pyarrow")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python and installed package versions (``CORE_PACKAGES`` + ``extra``), for run.json."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in (*CORE_PACKAGES, *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet(path: str | Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class RejectWriter:
    """Appends rejected rows with their reason to ``rejected.jsonl`` (opened lazily)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        self._fh = None

    def __call__(self, error: Exception, raw: bytes | None, index: int) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", encoding="utf-8")
        raw_text = raw.decode("utf-8", errors="replace") if raw is not None else None
        rec = {"index": index, "file": getattr(error, "path", None), "line": getattr(error, "line", None),
               "field": getattr(error, "field", None), "reason": getattr(error, "reason", str(error)),
               "raw": raw_text}
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        self.count += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


PART_SECONDS = "trim_select.seconds"


def part_seconds(out_dir: str | Path) -> float:
    """Sum of the wall seconds the parts in ``OUT/parts/`` recorded (0 for parts without the field)."""
    total = 0.0
    for p in sorted((Path(out_dir) / "parts").glob("part-*.parquet")):
        meta = pq.read_schema(p).metadata or {}
        total += float(meta.get(PART_SECONDS.encode(), b"0"))
    return round(total, 3)


class ScoreWriter:
    """Owns ``DIR/parts/part-NNNNN.parquet``: one file per scoring chunk, written atomically.

    ``manifest.json`` pins the settings (``key``); a rerun with a different key refuses to mix
    results unless ``overwrite``.
    """

    def __init__(self, out_dir: str | Path, key: str, *, overwrite: bool = False, shard: str = "",
                 inputs: dict[str, Any] | None = None):
        self.dir = Path(out_dir) / "parts"
        self.key = key
        self.shard = shard
        self.computed = 0  # chunks scored by this process (run.json: proof that a resume reused parts)
        self._since = time.perf_counter()  # a part records the wall seconds since the writer's last write
        manifest = self.dir / "manifest.json"
        prev: dict[str, Any] = {}
        if manifest.exists():
            prev = json.loads(manifest.read_text())
            old = prev.get("key")
            if old != key:
                check_unchanged(prev.get("inputs") or {}, inputs or {}, self.dir, overwrite=overwrite)
                if not overwrite:
                    raise RuntimeError(
                        f"{self.dir} holds partial scores from different settings (key {old} != {key}); "
                        "rerun with --overwrite or choose another --out"
                    )
                for p in self.dir.glob("part-*.parquet"):
                    p.unlink()
                prev = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        if not shard:  # concurrent shard writers: another process's temporary file is not stale
            for stale in self.dir.glob(".*.tmp"):  # left by a process killed mid-write (kill -9)
                stale.unlink(missing_ok=True)
        # a writer given no inputs (a ray actor) keeps those the driver recorded for the same key
        write_json(manifest, {"key": key, "inputs": inputs if inputs is not None else prev.get("inputs") or {}})

    def part_path(self, chunk: int) -> Path:
        return self.dir / f"part-{chunk:06d}.parquet"

    def done(self, chunk: int) -> bool:
        return self.part_path(chunk).exists()

    def write(self, chunk: int, columns: dict[str, np.ndarray | list]) -> None:
        """Part ``chunk``, with the seconds this process spent on it (``PART_SECONDS`` metadata), so a
        resumed run still reports what all its parts cost (:func:`part_seconds`)."""
        now = time.perf_counter()
        table = pa.table(columns).replace_schema_metadata({PART_SECONDS: f"{now - self._since:.3f}"})
        write_parquet(self.part_path(chunk), table)
        self._since = now

    def read_all(self) -> pa.Table:
        parts = sorted(self.dir.glob("part-*.parquet"))
        if not parts:
            return pa.table({c: [] for c in SCORE_COLUMNS})
        tables = [pq.read_table(p).replace_schema_metadata(None) for p in parts]  # timings stay in the parts
        return pa.concat_tables(tables).sort_by("index")


def copy_selected_lines(records_raw: dict[int, bytes], order: list[int], path: str | Path) -> None:
    """Write the selected records, best first, byte-for-byte as read (one JSON object per line)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for i in order:
            fh.write(records_raw[i])
            fh.write(b"\n")
