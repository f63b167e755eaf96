"""Several target sets in one pool pass (issue 13, ``docs/SPEC.md`` "Extensions"), in-process.

``OUT/<name>/`` holds exactly what a single-target ``select`` of target ``name`` into its own folder
writes (``fingerprints.safetensors``, ``parts/``, ``scores.parquet``, ``coreset.jsonl``,
``run.json``); ``OUT/run.json`` lists the targets, their folders and the shared cost. Stage I runs
(or is reused from its cache) per target; Stage II forwards every pool batch once and matches it
against every target (:meth:`~trim_select.scoring.Scorer.score_sequences_many`). Resume: chunk ``k``
is done when every target's ``parts/part-k`` exists; a chunk missing in any target is rescored
(same batches, so the same numbers) and written where it is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import ReadStats, Record, read_records
from ..fingerprints import Fingerprints
from ..generic import resolve_generic
from ..host import RenderPool
from ..interrupts import check_stop
from ..io import RejectWriter, ScoreWriter, file_identity, part_seconds
from ..outputs import RunReport, duplicate_ids
from ..progress import count_rows, progress_bar
from ..scoring import Scorer
from .base import column_sum, resolve_fingerprints
from .faults import FaultInjector

if TYPE_CHECKING:
    from ..selector import TrimSelector

TARGET_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
MULTI_ENGINE_ERROR = "several target sets run on the in-process engine for now"


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


def _stage1(sel: TrimSelector, out_dir: Path, targets: Mapping[str, Path], target_format: str | None
            ) -> tuple[dict[str, Fingerprints], dict[str, dict[str, Any]]]:
    fps, stats = {}, {}
    for name, path in targets.items():
        sel.stats.pop("targets", None)
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        resolve_fingerprints(sel, out_dir / name, targets=path, target_format=target_format)
        fps[name] = sel.fingerprints
        stats[name] = sel.stats.get("targets")
    return fps, stats


def score_pool_many(sel: TrimSelector, pool: str | Path, out_dir: Path, fps: Mapping[str, Fingerprints], *,
                    format: str | None = None, skip_invalid: bool = False, overwrite: bool = False,
                    on_part: Callable[[int], None] | None = None) -> tuple[dict[str, Any], ReadStats]:
    """Stage II for every target in one pass; returns ``{name: table}`` and the pool's read counts."""
    t0 = time.perf_counter()
    rt, sc = sel.runtime, sel.score_config
    resolve_generic(sel, pool, out_dir, format=format, skip_invalid=skip_invalid)  # one set for every target
    writers = {}
    for name, fp in fps.items():
        sel.fingerprints = fp
        writers[name] = ScoreWriter(out_dir / name, sel.scores_key(pool, format=format, skip_invalid=skip_invalid),
                                    overwrite=overwrite)
    idf = sel.pool_idf(pool, format=format, skip_invalid=skip_invalid) if sc.idf else None
    scorer = Scorer(sel.lm.model, dict(fps), penalty=sc.penalty, mean_weight=sc.mean_weight,
                    max_weight=sc.max_weight, coverage_weight=sc.coverage_weight, idf=idf,
                    batch_tokens=rt.batch_tokens, max_batch_size=rt.max_batch_size, compile=rt.compile,
                    mask_free=rt.mask_free, hidden_layer=sel.fingerprint_config.hidden_layer, generic=sel.generic)
    stats = ReadStats()
    rejects = [RejectWriter(out_dir / name / "rejected.jsonl") for name in fps]
    records = read_records(pool, format, skip_invalid=skip_invalid, stats=stats, track_ids=False,
                           on_reject=lambda *a: [r(*a) for r in rejects])
    bar = progress_bar(count_rows(pool), "Stage II scoring", sel.progress)
    with RenderPool(sel.renderer(), rt.tokenizer_workers) as renderer:
        for k, chunk in enumerate(_chunks(records, rt.chunk_size)):
            todo = [n for n, w in writers.items() if not w.done(k)]
            if not todo:
                bar.update(len(chunk))
                continue
            seqs = renderer.render(chunk)
            details = scorer.score_sequences_many(seqs, on_batch=bar.update)
            base = {"index": np.array([r.index for r in chunk], dtype=np.int64), "id": [r.id for r in chunk]}
            trunc = np.array([s.n_truncated for s in seqs], dtype=np.int64)
            for name in todo:
                writers[name].write(k, {**base, **details[name].columns(), "n_truncated": trunc})
                if on_part is not None:
                    on_part(k)
                check_stop()  # a swallowed SIGINT/SIGTERM still stops the run
    bar.close()
    for r in rejects:
        r.close()
    sel.times.add("stage2_scoring", t0)
    return {name: w.read_all() for name, w in writers.items()}, stats


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
    fps, target_stats = _stage1(sel, out_dir, targets, target_format)
    tables, stats = score_pool_many(sel, pool, out_dir, fps, format=format, skip_invalid=skip_invalid,
                                    overwrite=overwrite, on_part=lambda k: fault.part_written())
    shared = dict(sel.times.seconds)
    entries = {}
    for name, table in tables.items():
        sel.fingerprints = fps[name]
        sel.stats = {"targets": target_stats[name], "pool": stats.to_dict()}
        sel.stats["pool"]["duplicate_ids"], sel.stats["pool"]["duplicate_examples"] = duplicate_ids(table)
        sel.stats["pool"]["truncated"] = column_sum(table, "n_truncated", count_nonzero=True)
        sel.stats["pool"]["tokens"] = column_sum(table, "n_tokens")
        report = sel.finalize(pool, out_dir / name, table, budgets[name], format=format,
                              extra={"targets": file_identity(targets[name]), "fingerprints_file": None,
                                     "multi_target": {"names": list(tables), "shared_pool_pass": True},
                                     **(extra or {})})
        report.timings["total"] = round(time.perf_counter() - t_start, 3)
        report.write(out_dir / name)
        entries[name] = {"folder": name, "targets": file_identity(targets[name]), "budget": budgets[name],
                         "selected": report["counts"]["selected"], "scored": report["counts"]["scored"]}
    tokens = column_sum(next(iter(tables.values())), "n_tokens") if tables else 0
    n_target = sum(int(fp.meta.get("n_targets") or 0) for fp in fps.values())
    n_target_tok = sum(int(fp.meta.get("n_target_tokens") or 0) for fp in fps.values())
    wall = round(time.perf_counter() - t_start, 3)
    top = RunReport({"command": "select", "pool": file_identity(pool), "targets": entries,
                     "timings_s": {**shared, "total": wall},
                     **(extra or {})})
    top["cost"] = {"wall_seconds": wall, "forward_passes": n_target + stats.records, "backward_passes": 0,
                   "tokens": tokens + n_target_tok, "pool_passes": 1,
                   "stage2_seconds_all_runs": max((part_seconds(out_dir / n) for n in tables), default=0.0)}
    return top
