"""The engine dispatcher (``docs/SPEC.md`` "Engines"): :func:`run` picks who runs the steps:
in-process (one device), ``local`` workers, or ``ray``; ``--shard`` jobs use :func:`run_shard` and
:func:`merge`. Every engine gives the scores and coreset of an uninterrupted single-process run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..locking import folder_lock
from ..outputs import RunReport
from ..selector import TrimSelector
from .base import (
    FP_FILE,
    PLAN_FILE,
    ShardPlan,
    merge,
    merge_report,
    parse_shard,
    part_path,
    prepare,
    resolve_fingerprints,
    run_in_process,
)
from .faults import FAULT_AFTER_ENV, FAULT_ONCE_ENV
from .local import local_devices, score_local
from .ray import plan_chunks, read_span_rows, score_ray
from .shards import run_shard

ENGINES: tuple[str, ...] = ("local", "ray")

__all__ = ["ENGINES", "FAULT_AFTER_ENV", "FAULT_ONCE_ENV", "FP_FILE", "PLAN_FILE", "ShardPlan", "execute",
           "local_devices", "merge", "merge_report", "parse_shard", "part_path", "plan_chunks", "prepare",
           "read_span_rows", "resolve_fingerprints", "run", "run_in_process", "run_shard", "score_local",
           "score_ray"]


def execute(sel: TrimSelector, pool: str | Path, out_dir: str | Path, budget: str | int | float | None, *,
            engine: str = "local", workers: int | None = None, ray_address: str | None = None,
            targets: str | Path | None = None, fingerprints: str | Path | None = None,
            format: str | None = None, target_format: str | None = None, skip_invalid: bool = False,
            overwrite: bool = False, extra: dict[str, Any] | None = None) -> RunReport:
    """Stage I -> Stage II -> selection on an engine; returns the report without writing ``run.json``.
    ``local`` with a single device is the in-process engine; otherwise Stage I in this process,
    Stage II on the workers, then the merge."""
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if ray_address is not None and engine != "ray":
        raise ValueError("--ray-address needs --engine ray")
    io = {"targets": targets, "fingerprints": fingerprints, "format": format, "target_format": target_format,
          "skip_invalid": skip_invalid}
    if engine == "local" and len(local_devices(sel.runtime, workers)) == 1:
        return run_in_process(sel, pool, out_dir, budget, overwrite=overwrite, extra=extra, **io)
    t0 = time.perf_counter()
    plan = prepare(sel, pool, out_dir, overwrite=overwrite, engine=engine,
                   chunking="rows" if engine == "ray" else "records", **io)
    if engine == "ray":
        info = score_ray(sel, plan, out_dir, workers=workers, ray_address=ray_address, progress=sel.progress)
    else:
        sel.release_model()
        info = score_local(plan, out_dir, workers=workers, progress=sel.progress)
    times = dict(sel.times.seconds)
    times["stage2_scoring"] = info.get("scoring_s", 0.0)
    report = merge_report(out_dir, budget, pool=pool, extra=info, times=times)
    report.update(extra or {})  # the caller's top-level run.json fields, as the in-process run records them
    report.timings["total"] = round(time.perf_counter() - t0, 3)
    return report


def run(sel: TrimSelector, pool: str | Path, out_dir: str | Path, budget: str | int | float | None,
        **kw: Any) -> RunReport:
    """:func:`execute`, then ``run.json`` (written once, here: this is a top-level call); ``out_dir``
    is locked for the call (:mod:`trim_select.locking`)."""
    with folder_lock(out_dir, f"select --engine {kw.get('engine', 'local')}"):
        report = execute(sel, pool, out_dir, budget, **kw)
        report.write(out_dir)
    return report
