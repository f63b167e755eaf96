"""Output IO, apart from the math: atomic files, the score-chunk writer with resume, coreset copy.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written output. Scores are written chunk by chunk (``DIR/parts/``); a chunk
file is the completion marker of its chunk, so a rerun recomputes only unfinished chunks.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def file_identity(path: str | Path) -> dict[str, Any]:
    """A file's or folder's resolved path and size in bytes: the cheap identity cache keys use."""
    p = Path(path).resolve()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return {"path": str(p), "bytes": size}


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


class ScoreWriter:
    """Owns ``DIR/parts/part-NNNNN.parquet``: one file per scoring chunk, written atomically.

    ``manifest.json`` pins the settings (``key``); a rerun with a different key refuses to mix
    results unless ``overwrite``.
    """

    def __init__(self, out_dir: str | Path, key: str, *, overwrite: bool = False, shard: str = ""):
        self.dir = Path(out_dir) / "parts"
        self.key = key
        self.shard = shard
        manifest = self.dir / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text()).get("key")
            if old != key:
                if not overwrite:
                    raise RuntimeError(
                        f"{self.dir} holds partial scores from different settings (key {old} != {key}); "
                        "rerun with --overwrite or choose another --out"
                    )
                for p in self.dir.glob("part-*.parquet"):
                    p.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not shard:  # concurrent shard writers: another process's temporary file is not stale
            for stale in self.dir.glob(".*.tmp"):  # left by a process killed mid-write (kill -9)
                stale.unlink(missing_ok=True)
        write_json(manifest, {"key": key})

    def part_path(self, chunk: int) -> Path:
        return self.dir / f"part-{chunk:06d}.parquet"

    def done(self, chunk: int) -> bool:
        return self.part_path(chunk).exists()

    def write(self, chunk: int, columns: dict[str, np.ndarray | list]) -> None:
        write_parquet(self.part_path(chunk), pa.table(columns))

    def read_all(self) -> pa.Table:
        parts = sorted(self.dir.glob("part-*.parquet"))
        if not parts:
            return pa.table({c: [] for c in SCORE_COLUMNS})
        return pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("index")


def copy_selected_lines(records_raw: dict[int, bytes], order: list[int], path: str | Path) -> None:
    """Write the selected records, best first, byte-for-byte as read (one JSON object per line)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for i in order:
            fh.write(records_raw[i])
            fh.write(b"\n")
