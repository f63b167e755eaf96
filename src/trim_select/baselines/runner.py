"""``run_baseline``: read the pool and targets, score with one baseline, select and write the
layout of ``select`` (``scores.parquet``, ``coreset.jsonl``, ``rejected.jsonl``, ``run.json``)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import to_dict
from ..data import ReadStats, read_records
from ..io import RejectWriter, check_unchanged, file_identity, package_versions, write_parquet
from ..locking import folder_lock
from ..outputs import RunReport, add_selection, selection_counts, write_coreset
from ..selection import parse_budget
from . import bm25, dsir, less, random_sample, rds  # noqa: F401  (register the methods)
from .base import BASELINES, BaselineConfig, BaselineInputs, BaselineMethod, BaselineScores, SelectionCost


def method_config(method: str, **overrides: Any) -> Any:
    """The method's config with ``overrides`` (unknown names raise ``ValueError``)."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; expected one of {sorted(BASELINES)}")
    cls = BASELINES[method].config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{method} has no settings {unknown}; it takes {sorted(known)}")
    return cls(**overrides)


def selection_table(index: np.ndarray, ids: list[str], result: BaselineScores, budget: str | int | float
                    ) -> tuple[pa.Table, np.ndarray]:
    """``scores.parquet`` columns and the chosen positions (best first), as ``select`` writes them."""
    scores = np.asarray(result.score, dtype=np.float64)
    cols: dict[str, Any] = {"index": np.asarray(index, dtype=np.int64), "id": ids, "score": scores}
    for name, values in result.columns.items():
        if name in cols or name in ("selected", "rank"):
            raise ValueError(f"a baseline may not overwrite the column {name!r}")
        cols[name] = values
    return add_selection(pa.table(cols), budget)


def write_selection_outputs(pool: str | Path, records: list, result: BaselineScores, budget: str | int | float,
                            out_dir: Path, *, format: str | None, digest: str) -> np.ndarray:
    """``scores.parquet`` and ``coreset.jsonl`` (copied from the pool whose content is ``digest``);
    returns the chosen positions, best first."""
    index = np.array([r.index for r in records], dtype=np.int64)
    table, chosen = selection_table(index, [r.id for r in records], result, budget)
    write_coreset(pool, index[chosen].tolist(), out_dir / "coreset.jsonl", format=format,
                  ids=[records[i].id for i in chosen.tolist()], digest=digest)
    write_parquet(out_dir / "scores.parquet", table)
    return chosen


def read_inputs(pool: str | Path, targets: str | Path, out_dir: Path, stats: tuple[ReadStats, ReadStats], *,
                format: str | None, target_format: str | None, skip_invalid: bool) -> tuple[list, list]:
    """The pool records (bad rows to ``OUT/rejected.jsonl`` with ``skip_invalid``) and the targets."""
    rejects = RejectWriter(out_dir / "rejected.jsonl")
    try:
        records = list(read_records(pool, format, skip_invalid=skip_invalid, stats=stats[0], on_reject=rejects))
    finally:
        rejects.close()
    target_records = list(read_records(targets, target_format, stats=stats[1]))
    if not target_records:
        raise ValueError(f"{targets}: the target set is empty")
    return records, target_records


def run_baseline(
    method: str,
    pool: str | Path,
    targets: str | Path,
    out_dir: str | Path,
    budget: str | int | float,
    *,
    config: BaselineConfig | None = None,
    method_settings: Any = None,
    format: str | None = None,
    target_format: str | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> RunReport:
    """Score the pool with baseline ``method``, select ``budget`` and write the output layout.

    ``config``: shared settings (seed, model, render, runtime); ``method_settings``: the method's
    config (``BM25Config`` ...). Defaults when None. Returns the ``run.json`` report. ``out_dir`` is
    locked; a pool or targets file changed since ``OUT/run.json`` was written is refused unless
    ``overwrite``.
    """
    out = Path(out_dir)
    with folder_lock(out, f"baseline {method}"):
        prev = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        check_unchanged({"pool": prev.get("pool"), "targets": prev.get("targets")},
                        {"pool": file_identity(pool), "targets": file_identity(targets)}, out, overwrite=overwrite)
        return _run_baseline(method, pool, targets, out, budget, config=config, method_settings=method_settings,
                             format=format, target_format=target_format, skip_invalid=skip_invalid,
                             progress=progress)


def _run_baseline(method: str, pool: str | Path, targets: str | Path, out_dir: Path, budget: str | int | float, *,
                  config: BaselineConfig | None, method_settings: Any, format: str | None,
                  target_format: str | None, skip_invalid: bool, progress: bool) -> RunReport:
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; expected one of {sorted(BASELINES)}")
    config = config if config is not None else BaselineConfig()
    spec = BASELINES[method]
    settings = method_settings if method_settings is not None else spec.config_cls()
    if not isinstance(settings, spec.config_cls):
        raise TypeError(f"{method} takes a {spec.config_cls.__name__}, got {type(settings).__name__}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cost = SelectionCost()

    t0 = time.perf_counter()
    pool_identity = file_identity(pool)  # the content read here is the content the coreset is copied from
    pool_stats, target_stats = ReadStats(), ReadStats()
    records, target_records = read_inputs(pool, targets, out_dir, (pool_stats, target_stats), format=format,
                                          target_format=target_format, skip_invalid=skip_invalid)
    cost.timed("read", t0)
    parse_budget(budget, len(records))  # a bad budget fails before the expensive part

    inputs = BaselineInputs(pool=records, targets=target_records, base=config, out_dir=out_dir,
                            progress=progress)
    t0 = time.perf_counter()
    result = spec.fn(inputs, settings, cost)
    scoring_s = time.perf_counter() - t0
    if len(result.score) != len(records):
        raise RuntimeError(f"{method} returned {len(result.score)} scores for {len(records)} pool records")

    t0 = time.perf_counter()
    chosen = write_selection_outputs(pool, records, result, budget, out_dir, format=format,
                                     digest=pool_identity["xxh3_128"])
    cost.timed("selection", t0)
    wall = time.perf_counter() - t_start
    scores = np.asarray(result.score, dtype=np.float64)
    report = RunReport({
        "command": "baseline",
        "method": method,
        "summary": spec.summary,
        "pool": pool_identity,
        "targets": file_identity(targets),
        "digests": {"scores.parquet": {"pool": pool_identity["xxh3_128"],
                                       "targets": file_identity(targets)["xxh3_128"]},
                    "coreset.jsonl": {"pool": pool_identity["xxh3_128"]}},
        "budget": budget,
        "seed": config.seed,
        # the counts of select; lengths are not measured here (the methods truncate on their own)
        "counts": selection_counts({**pool_stats.to_dict(), "truncated": None, "tokens": None}, scores, chosen),
        "read_stats": {"pool": pool_stats.to_dict(), "targets": target_stats.to_dict()},
        "config": {"method": to_dict(settings), **_baseline_config(config, spec)},
        "method_info": result.info,
        "model": result.model,
        "cost": {"wall_seconds": round(wall, 3), "scoring_seconds": round(scoring_s, 3), **cost.to_dict()},
        "versions": package_versions(("bm25s", "data-selection", "nltk", "scipy")),
        "timings_s": {**cost.seconds, "scoring": round(scoring_s, 3), "total": round(wall, 3)},
    })
    report.write(out_dir)
    return report


def _baseline_config(config: BaselineConfig, spec: BaselineMethod) -> dict[str, Any]:
    """Shared settings that mattered (model, render and runtime only for model-based methods), beside
    ``method`` in ``config``: ``render`` and ``runtime`` where select has them."""
    out: dict[str, Any] = {"seed": config.seed}
    if spec.uses_model:
        out |= {"model": config.model, "checkpoints": config.checkpoints, "render": to_dict(config.render),
                "runtime": to_dict(config.runtime)}
    return out
