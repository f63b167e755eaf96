"""Several target sets in one pool pass (issue 13, ``docs/SPEC.md`` "Extensions"): the steps every
engine shares, and the in-process engine.

``OUT/<name>/`` holds exactly what a single-target ``select`` of target ``name`` on the same engine
into its own folder writes (``fingerprints.safetensors``, ``parts/``, ``scores.parquet``,
``coreset.jsonl``, ``run.json``; ``shards.json`` on the local/ray/shard engines); ``OUT/run.json``
lists the targets, their folders and the shared cost (on those engines ``OUT/targets.json`` records
the target sets for ``trim-select merge OUT``). Stage I runs (or is reused from its cache) per target;
Stage II forwards every pool batch once and matches it against every target
(:meth:`~trim_select.scoring.Scorer.score_sequences_many`), in this process, in each local worker or
shard job (:func:`score_pool_many`), or in each Ray actor. Resume: chunk ``k`` is done when every
target's ``parts/part-k`` exists; a chunk missing in any target is rescored (same batches, so the
same numbers) and written where it is missing.

Timings: each ``OUT/<name>/run.json`` records its own Stage I and selection seconds and the shared
Stage II seconds (its parts record the seconds of the shared chunk pass), as a single-target run
would; ``OUT/run.json`` records the shared pool pass once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import ReadStats, Record, read_records
from ..fingerprints import Fingerprints
from ..generic import resolve_generic
from ..host import RenderPool
from ..interrupts import check_stop
from ..io import RejectWriter, ScoreWriter, file_identity, part_seconds, write_json
from ..outputs import RunReport, duplicate_ids
from ..progress import count_rows, progress_bar
from .base import (
    FP_FILE,
    ShardPlan,
    column_sum,
    make_scorer,
    merge_report,
    missing_chunks,
    prepare,
    resolve_fingerprints,
    score_chunk,
)
from .faults import FaultInjector

if TYPE_CHECKING:
    from ..selector import TrimSelector

TARGET_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
MULTI_PLAN_FILE = "targets.json"  # the target sets of a multi-target run on the local/ray/shard engines


def target_stem(path: Path) -> str:
    name = path.name
    for suffix in TARGET_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def target_sets(paths: Iterable[str | Path]) -> dict[str, Path]:
    """``--targets`` values (files, ``NAME=FILE``, or folders of ``*.jsonl``/``*.jsonl.gz``/``*.parquet``)
    -> ``{name: file}``; the name is ``NAME`` or the file stem; two target sets with one name are refused."""
    found: list[tuple[str, Path]] = []
    for value in map(str, paths):
        name, sep, rest = value.partition("=")
        if sep and "/" not in name and not Path(value).exists():  # NAME=PATH names a target set
            found.append((name, Path(rest)))
            continue
        p = Path(value)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(TARGET_SUFFIXES))
            if not files:
                raise ValueError(f"--targets {p}: no *.jsonl, *.jsonl.gz or *.parquet target file in this folder")
            found.extend((target_stem(f), f) for f in files)
        else:
            found.append((target_stem(p), p))
    out: dict[str, Path] = {}
    for name, f in found:
        if not name:
            raise ValueError(f"--targets {f}: empty target set name")
        if name in out:
            raise ValueError(f"two target sets are named {name!r} ({out[name]} and {f}): the name of a target "
                             "set is its file stem (or NAME in --targets NAME=FILE) and names its output folder")
        out[name] = f
    return out


def parse_budgets(values: Iterable[str], names: Iterable[str]) -> dict[str, str]:
    """``--budget 5%`` (every target) or ``--budget NAME=5% --budget NAME2=100`` -> ``{name: budget}``."""
    values, names = list(values), list(names)
    plain = [v for v in values if "=" not in v]
    named = dict(v.split("=", 1) for v in values if "=" in v)
    if len(plain) > 1 or (plain and named):
        raise ValueError(f"--budget: give one budget for every target or NAME=BUDGET per target, got {values}")
    unknown = sorted(set(named) - set(names))
    if unknown:
        raise ValueError(f"--budget names unknown target sets {unknown}; the targets are {names}")
    if plain:
        return dict.fromkeys(names, plain[0])
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"--budget: no budget for target sets {missing} (give NAME=BUDGET for each)")
    return {n: named[n] for n in names}


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def stage1_many(sel: TrimSelector, out_dir: Path, targets: Mapping[str, Path],
                step: Callable[[Path, Path], Any]) -> tuple[dict[str, Fingerprints], dict[str, Any], dict[str, Any]]:
    """Stage I per target set through ``step(OUT/<name>, targets file)`` (:func:`.base.resolve_fingerprints`
    or :func:`.base.prepare`); returns ``{name: fingerprints}``, ``{name: what step returned}`` and
    ``{name: {"targets": read counts, "seconds": its Stage I seconds}}``."""
    fps, results, own = {}, {}, {}
    for name, path in targets.items():
        sel.stats.pop("targets", None)
        before = sel.times.seconds.get("stage1_fingerprints", 0.0)
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        results[name] = step(out_dir / name, path)
        fps[name] = sel.fingerprints
        own[name] = {"targets": sel.stats.get("targets"),
                     "seconds": round(sel.times.seconds.get("stage1_fingerprints", 0.0) - before, 3)}
    return fps, results, own


def score_pool_many(sel: TrimSelector, pool: str | Path, dirs: Mapping[str, Path], fps: Mapping[str, Fingerprints],
                    *, format: str | None = None, skip_invalid: bool = False, overwrite: bool = False,
                    shard: tuple[int, int] | None = None, on_part: Callable[[int], None] | None = None
                    ) -> tuple[dict[str, ScoreWriter], ReadStats]:
    """Stage II for every target in one pass (target ``name`` into ``dirs[name]/parts``); ``shard=(i, n)``
    scores only chunks ``k % n == i`` (a local worker or a ``--shard`` job). Returns the writers and
    the pool's read counts."""
    t0 = time.perf_counter()
    rt, sc = sel.runtime, sel.score_config
    sel.scored_pool = file_identity(pool)
    # one generic set for every target, kept in the first target's folder (where .base.prepare put it
    # before any worker started, on the scale-out engines)
    resolve_generic(sel, pool, next(iter(dirs.values())), format=format, skip_invalid=skip_invalid)
    writers = {}
    for name, fp in fps.items():
        sel.fingerprints = fp
        writers[name] = sel.score_writer(pool, dirs[name], format=format, skip_invalid=skip_invalid,
                                         overwrite=overwrite, shard=shard)
    idf = sel.pool_idf(pool, format=format, skip_invalid=skip_invalid) if sc.idf else None
    scorer = make_scorer(sel.lm.model, dict(fps), sc, rt, idf, hidden_layer=sel.hidden_layer,
                         generic=sel.generic_fingerprints())
    stats = ReadStats()
    rejects = [RejectWriter(d / "rejected.jsonl") for d in dirs.values()]
    records = read_records(pool, format, skip_invalid=skip_invalid, stats=stats, track_ids=False,
                           on_reject=lambda *a: [r(*a) for r in rejects])
    bar = progress_bar(count_rows(pool), "Stage II scoring", sel.progress)
    with RenderPool(sel.renderer(), rt.tokenizer_workers) as renderer:
        for k, chunk in enumerate(_chunks(records, rt.chunk_size)):
            mine = shard is None or k % shard[1] == shard[0]
            todo = {n: w for n, w in writers.items() if not w.done(k)} if mine else {}
            if todo:
                score_chunk(todo, k, scorer, chunk, renderer.render(chunk), on_batch=bar.update, on_part=on_part)
            else:
                bar.update(len(chunk))
            check_stop()  # a swallowed SIGINT/SIGTERM still stops the run
    bar.close()
    for r in rejects:
        r.close()
    sel.times.timed("stage2_scoring", t0)
    return writers, stats


def target_times(shared: Mapping[str, float], own: Mapping[str, Any], name: str) -> dict[str, float]:
    """A target's ``timings_s`` before selection: the shared steps (model load, IDF, Stage II) and its own Stage I."""
    times = {k: v for k, v in shared.items() if k not in ("stage1_fingerprints", "selection", "total")}
    times["stage1_fingerprints"] = own[name]["seconds"]
    return times


def multi_extra(names: Iterable[str], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a target's ``run.json`` adds in a multi-target run."""
    return {"fingerprints_file": None, "multi_target": {"names": list(names), "shared_pool_pass": True},
            **(extra or {})}


def run_many_in_process(sel: TrimSelector, pool: str | Path, out_dir: str | Path, budgets: Mapping[str, Any],
                        targets: Mapping[str, Path], *, format: str | None = None,
                        target_format: str | None = None, skip_invalid: bool = False,
                        overwrite: bool = False, extra: dict[str, Any] | None = None) -> RunReport:
    """Every target's outputs in ``OUT/<name>/`` (its ``run.json`` written here); returns the
    top-level report (unwritten): the targets, their folders and the shared cost."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    fault = FaultInjector(**FaultInjector.settings())
    fps, _, own = stage1_many(sel, out_dir, targets, lambda d, path: resolve_fingerprints(
        sel, d, targets=path, target_format=target_format, overwrite=overwrite))
    dirs = {name: out_dir / name for name in targets}
    writers, stats = score_pool_many(sel, pool, dirs, fps, format=format, skip_invalid=skip_invalid,
                                     overwrite=overwrite, on_part=lambda k: fault.part_written())
    shared = dict(sel.times.seconds)
    reports = {}
    for name, writer in writers.items():
        table = writer.read_all()
        sel.fingerprints = fps[name]
        sel.times.seconds = target_times(shared, own, name)
        sel.stats = {"targets": own[name]["targets"], "pool": stats.to_dict()}
        sel.stats["pool"]["duplicate_ids"], sel.stats["pool"]["duplicate_examples"] = duplicate_ids(table)
        sel.stats["pool"]["truncated"] = column_sum(table, "n_truncated", count_nonzero=True)
        sel.stats["pool"]["tokens"] = column_sum(table, "n_tokens")
        report = sel.finalize(pool, dirs[name], table, budgets[name], format=format,
                              extra={"targets": file_identity(targets[name]), **multi_extra(targets, extra)})
        report.timings["total"] = round(sum(report.timings.values()), 3)
        report.write(dirs[name])
        reports[name] = report
    sel.times.seconds = shared
    return many_report(pool, out_dir, reports, budgets, shared, own, time.perf_counter() - t_start, extra)


def many_report(pool: str | Path, out_dir: Path, reports: Mapping[str, Mapping[str, Any]],
                budgets: Mapping[str, Any], shared: Mapping[str, float], own: Mapping[str, Any], wall: float,
                extra: Mapping[str, Any] | None) -> RunReport:
    """The top-level ``OUT/run.json`` of a multi-target run (unwritten): the targets, their folders,
    the shared pool pass counted once (``timings_s.stage2_scoring``, ``cost.stage2_seconds_all_runs``)
    and the sum of the targets' own Stage I and selection seconds."""
    entries = {name: {"folder": name, "targets": r.get("targets"), "budget": budgets.get(name),
                      "selected": r["counts"]["selected"], "scored": r["counts"]["scored"],
                      "stage1_seconds": own[name]["seconds"], "selection_seconds": r["timings_s"].get("selection")}
               for name, r in reports.items()}
    first = next(iter(reports.values()), {"counts": {}})
    n_target = sum(int(r["fingerprints"].get("n_targets") or 0) for r in reports.values())
    n_target_tok = sum(int(r["fingerprints"].get("n_target_tokens") or 0) for r in reports.values())
    wall = round(wall, 3)
    timings = {k: v for k, v in shared.items() if k not in ("stage1_fingerprints", "selection", "total")}
    timings.update(stage1_fingerprints=round(sum(e["stage1_seconds"] for e in entries.values()), 3),
                   selection=round(sum(e["selection_seconds"] or 0.0 for e in entries.values()), 3), total=wall)
    top = RunReport({"command": "select", "pool": file_identity(pool), "targets": entries, "timings_s": timings,
                     **(extra or {})})
    top["cost"] = {"wall_seconds": wall, "forward_passes": n_target + int(first["counts"].get("scored") or 0),
                   "backward_passes": 0, "tokens": int(first["counts"].get("pool_tokens") or 0) + n_target_tok,
                   "pool_passes": 1,
                   "stage2_seconds_all_runs": max((part_seconds(out_dir / n) for n in reports), default=0.0)}
    return top


def prepare_many(sel: TrimSelector, pool: str | Path, out_dir: Path, targets: Mapping[str, Path],
                 budgets: Mapping[str, Any], *, engine: str, shards: int | None = None, chunking: str = "records",
                 format: str | None = None, target_format: str | None = None, skip_invalid: bool = False,
                 overwrite: bool = False) -> tuple[dict[str, ShardPlan], dict[str, Fingerprints], dict[str, Any]]:
    """Driver side of the local/ray/shard engines, once: :func:`.base.prepare` per target set (its
    ``OUT/<name>/shards.json`` records its budget, as a shard job's does) and ``OUT/targets.json``."""
    def step(d: Path, path: Path) -> ShardPlan:
        plan = prepare(sel, pool, d, targets=path, format=format, target_format=target_format,
                       skip_invalid=skip_invalid, overwrite=overwrite, engine=engine, shards=shards,
                       chunking=chunking, save=False)
        plan.extra["budget"] = budgets[d.name]
        plan.save(d)
        return plan

    fps, plans, own = stage1_many(sel, out_dir, targets, step)
    write_json(out_dir / MULTI_PLAN_FILE, {"targets": {n: str(Path(p).resolve()) for n, p in targets.items()},
                                            "budgets": dict(budgets), "engine": engine})
    return plans, fps, own


def missing_many(out_dir: Path, names: Iterable[str], n_chunks: int) -> list[int]:
    """Chunks without a part in any target's folder."""
    return sorted({k for n in names for k in missing_chunks(out_dir / n, n_chunks)})


def merge_many(out_dir: str | Path, budgets: Mapping[str, Any] | None = None, *, pool: str | Path | None = None,
               info: dict[str, Any] | None = None, times: Mapping[str, float] | None = None,
               own: Mapping[str, Any] | None = None, extra: dict[str, Any] | None = None,
               wall_start: float | None = None) -> RunReport:
    """``trim-select merge`` of a multi-target run: :func:`.base.merge_report` per target (``info``: the
    engine's ``distributed`` fields; its ``run.json`` written here, with its own Stage I seconds when
    ``own`` has them); returns the top-level report (unwritten). ``budgets`` default to those recorded
    in ``OUT/targets.json``; ``extra``: the caller's fields of every ``run.json``."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter() if wall_start is None else wall_start
    plan = json.loads((out_dir / MULTI_PLAN_FILE).read_text())
    budgets = {**plan["budgets"], **(budgets or {})}
    own = own or {n: {"seconds": 0.0} for n in plan["targets"]}
    reports = {}
    for name in plan["targets"]:
        report = merge_report(out_dir / name, budgets[name], pool=pool, extra=info,
                              times=target_times(times or {}, own, name))
        report.update({"targets": Fingerprints.load(out_dir / name / FP_FILE).meta.get("targets"),
                       **multi_extra(plan["targets"], extra)})
        report.write(out_dir / name)
        reports[name] = report
    pool = pool if pool is not None else ShardPlan.load(out_dir / next(iter(plan["targets"]))).pool
    return many_report(pool, out_dir, reports, budgets, times or {}, own, time.perf_counter() - t0, extra)
