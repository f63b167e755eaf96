"""The engine dispatcher (``docs/SPEC.md`` "Engines"): :func:`run` picks who runs the steps:
in-process (one device), ``local`` workers, or ``ray``; ``--shard`` jobs use :func:`run_shard` and
:func:`merge`. Every engine gives the scores and coreset of an uninterrupted single-process run.

Several target sets (``--targets A --targets B``) run on every engine in one pool pass
(:func:`execute_many`, :mod:`.multi`).

On several nodes the pool and OUT must be on a filesystem every node sees (actors write the parts
there), and every node needs trim-select and the model::

    ray start --head                       # on the head node; `ray start --address HEAD:6379` on the others
    trim-select select --engine ray --ray-address auto --pool /shared/pool.jsonl \
        --targets targets.jsonl --budget 5% --out /shared/run

    # Slurm arrays instead of Ray: Stage I once, one array task per shard, then merge
    trim-select fingerprint --targets targets.jsonl --out /shared/run/fingerprints.safetensors
    sbatch --array=0-15 --gres=gpu:1 --wrap 'trim-select score --pool /shared/pool.jsonl \
        --fingerprints /shared/run/fingerprints.safetensors --out /shared/run --budget 5% \
        --shard $SLURM_ARRAY_TASK_ID/16'
    trim-select merge /shared/run           # names the missing chunks if a task failed
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fingerprints import Fingerprints
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
from .multi import merge_many, prepare_many, run_many_in_process
from .ray import plan_chunks, read_span_rows, score_ray
from .shards import run_shard, run_shard_many

ENGINES: tuple[str, ...] = ("local", "ray")

__all__ = ["ENGINES", "FAULT_AFTER_ENV", "FAULT_ONCE_ENV", "FP_FILE", "PLAN_FILE", "ShardPlan", "execute",
           "execute_many", "local_devices", "merge", "merge_many", "merge_report", "parse_shard", "part_path",
           "plan_chunks", "prepare", "read_span_rows", "resolve_fingerprints", "run", "run_in_process", "run_many",
           "run_shard", "run_shard_many", "score_local", "score_ray"]


def check_engine(engine: str, workers: int | None, ray_address: str | None) -> None:
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if ray_address is not None and engine != "ray":
        raise ValueError("--ray-address needs --engine ray")


def score_on(sel: TrimSelector, engine: str, out_dir: Path, plans: Mapping[str, ShardPlan],
             fps: Mapping[str, Fingerprints], *, workers: int | None, ray_address: str | None,
             many: bool = False) -> dict[str, Any]:
    """Stage II on the ray or local workers, to completion: one target set into ``out_dir``, or
    (``many``) every target set ``name`` of ``plans`` into ``out_dir/name``; returns the engine's info."""
    if engine == "ray":
        dirs = {name: out_dir / name for name in plans} if many else {name: out_dir for name in plans}
        return score_ray(sel, plans, dirs, fps, workers=workers, ray_address=ray_address, progress=sel.progress)
    sel.release_model()
    return score_local(next(iter(plans.values())), out_dir, workers=workers, progress=sel.progress,
                       targets=list(plans) if many else None)


def execute(sel: TrimSelector, pool: str | Path, out_dir: str | Path, budget: str | int | float | None, *,
            engine: str = "local", workers: int | None = None, ray_address: str | None = None,
            targets: str | Path | None = None, fingerprints: str | Path | None = None,
            format: str | None = None, target_format: str | None = None, skip_invalid: bool = False,
            overwrite: bool = False, extra: dict[str, Any] | None = None) -> RunReport:
    """Stage I -> Stage II -> selection on an engine; returns the report without writing ``run.json``.
    ``local`` with a single device is the in-process engine; otherwise Stage I in this process,
    Stage II on the workers, then the merge."""
    check_engine(engine, workers, ray_address)
    io = {"targets": targets, "fingerprints": fingerprints, "format": format, "target_format": target_format,
          "skip_invalid": skip_invalid}
    if engine == "local" and len(local_devices(sel.runtime, workers)) == 1:
        return run_in_process(sel, pool, out_dir, budget, overwrite=overwrite, extra=extra, **io)
    t0 = time.perf_counter()
    plan = prepare(sel, pool, out_dir, overwrite=overwrite, engine=engine,
                   chunking="rows" if engine == "ray" else "records", **io)
    info = score_on(sel, engine, Path(out_dir), {"target": plan}, {"target": sel.fingerprints}, workers=workers,
                    ray_address=ray_address)
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


def execute_many(sel: TrimSelector, pool: str | Path, out_dir: str | Path, budgets: Mapping[str, Any],
                 targets: Mapping[str, Path], *, engine: str = "local", workers: int | None = None,
                 ray_address: str | None = None, format: str | None = None, target_format: str | None = None,
                 skip_invalid: bool = False, overwrite: bool = False,
                 extra: dict[str, Any] | None = None) -> RunReport:
    """Several target sets in one pool pass on an engine (:mod:`.multi`): each ``OUT/<name>/`` holds what
    :func:`execute` of that target set on the same engine writes (its ``run.json`` written here);
    returns the top-level report, unwritten. ``local`` with a single device is the in-process engine."""
    check_engine(engine, workers, ray_address)
    io = {"format": format, "target_format": target_format, "skip_invalid": skip_invalid, "overwrite": overwrite}
    if engine == "local" and len(local_devices(sel.runtime, workers)) == 1:
        return run_many_in_process(sel, pool, out_dir, budgets, targets, extra=extra, **io)
    t0, out_dir = time.perf_counter(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans, fps, own = prepare_many(sel, pool, out_dir, targets, budgets, engine=engine,
                                   chunking="rows" if engine == "ray" else "records", **io)
    info = score_on(sel, engine, out_dir, plans, fps, workers=workers, ray_address=ray_address, many=True)
    times = {**sel.times.seconds, "stage2_scoring": info.get("scoring_s", 0.0)}
    return merge_many(out_dir, budgets, pool=pool, info=info, times=times, own=own, extra=extra, wall_start=t0)


def run_many(sel: TrimSelector, pool: str | Path, out_dir: str | Path, budgets: Mapping[str, Any],
             targets: Mapping[str, Path], **kw: Any) -> RunReport:
    """:func:`execute_many`, then ``OUT/run.json``; ``out_dir`` is locked for the call."""
    with folder_lock(out_dir, f"select --targets (several) --engine {kw.get('engine', 'local')}"):
        report = execute_many(sel, pool, out_dir, budgets, targets, **kw)
        report.write(out_dir)
    return report
