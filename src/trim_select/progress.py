"""Progress bars, stage timers and cheap row counts shared by the selector, the engines and the baselines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm


@dataclass
class StageTimes:
    """Seconds per named stage, as reported in ``run.json`` (``stage_seconds``)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, t0: float) -> None:
        """Add the seconds since ``t0`` (a ``time.perf_counter()`` reading) to stage ``name``."""
        self.add_seconds(name, time.perf_counter() - t0)

    def add_seconds(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name`` (a reused result repeats the seconds it cost)."""
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)


class NoBar:
    """A progress bar that shows nothing (``progress=False``)."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    """A tqdm bar in examples, or :class:`NoBar` when disabled."""
    if not enabled:
        return NoBar()
    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, smoothing=0.1)


def count_rows(path: str | Path) -> int | None:
    """Non-blank lines of a JSON Lines file or rows of a parquet file (progress totals); else None."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".jsonl"):
        with open(p, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    if p.is_file() and p.suffix == ".parquet":
        return pq.ParquetFile(p).metadata.num_rows
    return None
