"""Shards: ``trim-select score --shard i/n`` (e.g. Slurm array jobs) scores chunks ``k % n == i``;
``trim-select merge OUT`` (:func:`.base.merge`) later checks that every chunk is there and writes
``scores.parquet``, the coreset and ``run.json`` (``docs/SPEC.md`` "Engines")."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..locking import folder_lock
from ..selector import TrimSelector
from .base import missing_chunks, prepare
from .multi import missing_many, prepare_many, score_pool_many


def run_shard(sel: TrimSelector, pool: str | Path, out_dir: str | Path, shard: tuple[int, int], *,
              budget: str | int | float | None = None, targets: str | Path | None = None,
              fingerprints: str | Path | None = None, format: str | None = None,
              target_format: str | None = None, skip_invalid: bool = False) -> dict[str, Any]:
    """One ``--shard i/n`` job: score chunks ``k % n == i`` into ``OUT/parts``; merge comes later
    (``budget`` is recorded in ``shards.json`` as merge's default). Holds the shard's own lock, so
    shards of one folder run side by side but the same shard twice does not."""
    with folder_lock(out_dir, f"score --shard {shard[0]}/{shard[1]}", shard=shard):
        return _run_shard(sel, pool, out_dir, shard, budget=budget, targets=targets, fingerprints=fingerprints,
                          format=format, target_format=target_format, skip_invalid=skip_invalid)


def _run_shard(sel: TrimSelector, pool: str | Path, out_dir: str | Path, shard: tuple[int, int], *,
               budget: str | int | float | None, targets: str | Path | None, fingerprints: str | Path | None,
               format: str | None, target_format: str | None, skip_invalid: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = prepare(sel, pool, out_dir, targets=targets, fingerprints=fingerprints, format=format,
                   target_format=target_format, skip_invalid=skip_invalid, engine="shards", shards=shard[1],
                   save=False)
    plan.extra["budget"] = budget
    plan.save(out_dir)
    sel.score_pool(pool, out_dir, format=format, skip_invalid=skip_invalid, shard=shard)
    n_chunks = math.ceil(int(sel.stats["pool"]["records"]) / sel.runtime.chunk_size)
    mine = [k for k in range(n_chunks) if k % shard[1] == shard[0]]
    return {"shard": list(shard), "chunks": len(mine), "computed": sel.stats.get("chunks_computed", 0),
            "missing_overall": missing_chunks(out_dir, n_chunks),
            "seconds": round(time.perf_counter() - t0, 3)}


def run_shard_many(sel: TrimSelector, pool: str | Path, out_dir: str | Path, shard: tuple[int, int], *,
                   budgets: Mapping[str, Any], targets: Mapping[str, Path], format: str | None = None,
                   target_format: str | None = None, skip_invalid: bool = False) -> dict[str, Any]:
    """One ``--shard i/n`` job of several target sets (:mod:`.multi`): Stage I of each into ``OUT/<name>/``,
    then chunks ``k % n == i`` of the pool scored once for all of them; ``trim-select merge OUT`` later
    writes every target's outputs and ``OUT/run.json``."""
    with folder_lock(out_dir, f"score --shard {shard[0]}/{shard[1]} --targets (several)", shard=shard):
        t0, out_dir = time.perf_counter(), Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _, fps, _ = prepare_many(sel, pool, out_dir, targets, budgets, engine="shards", shards=shard[1],
                                 format=format, target_format=target_format, skip_invalid=skip_invalid)
        writers, stats = score_pool_many(sel, pool, {n: out_dir / n for n in targets}, fps, format=format,
                                         skip_invalid=skip_invalid, shard=shard)
        n_chunks = math.ceil(stats.records / sel.runtime.chunk_size)
        return {"shard": list(shard), "chunks": sum(1 for k in range(n_chunks) if k % shard[1] == shard[0]),
                "computed": max(w.computed for w in writers.values()),
                "missing_overall": missing_many(out_dir, targets, n_chunks),
                "seconds": round(time.perf_counter() - t0, 3)}
