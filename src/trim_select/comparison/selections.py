"""The selections ``compare`` trains on: TRIM for every task in one pool pass, the warmup shared by
every task, the baselines, and the fairness controls applied to each coreset.

- ``trim``: :class:`~trim_select.selector.TrimSelector` on the base model, all tasks' target sets
  in one pool pass (:func:`~trim_select.engines.multi.run_many_in_process`; ``OUT/<task>/`` is what
  a single-target ``select`` writes).
- ``trim-warmup``: the same on the warmed model (``docs/SPEC.md`` "Warmup": LoRA on a seeded 5% of
  the pool with the recipe of ``trim-select run``); the warmup is trained once per compare run
  and also gives LESS its checkpoints. LESS without a warmup is refused: its features are the
  warmup's Adam-preconditioned gradients, and a fresh LoRA is a different method.
- ``trim-generic``, ``trim-layer-N``, ``trim-layer-N-generic``: TRIM on the base model with the
  extensions of ``docs/SPEC.md`` "Extensions" (:func:`trim_variant`): the generic correction with
  ``GENERIC_ROWS`` rows (the ablation's), fingerprints and states from hidden layer N; like ``trim``,
  all tasks in one pool pass per variant (``OUT/select/<method>/<task>/``).
- baselines: :func:`trim_select.baselines.run_baseline`, one folder per (task, method[, seed]).
- external selections (``compare --selection NAME=DIR``): a ranking made elsewhere, e.g. by
  ``trim-select select`` with other options or by a script of a peer method, read from
  ``DIR/<task>/scores.parquet`` (``DIR/scores.parquet`` when the run has one task;
  :func:`external_selection`), with the ``index``/``score`` columns ``select`` writes.

Controls (:func:`training_rows`), applied to every method alike, in this order:

1. ``decontaminate``: pool rows whose word 13-grams overlap a test row of the task
   (:mod:`.decontamination`) leave the ranking;
2. fill-up: a method whose filter leaves fewer rows than the budget (DSIR's ``min_words`` gives
   ``-inf``) is filled with its next-ranked rows (DSIR: by importance weight), so every method
   trains on the same number of rows;
3. ``match_tokens``: every method's coreset is the prefix of its own ranking whose token total is
   closest to the reference method's coreset (:func:`.controls.prefix_for_tokens`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..config import FingerprintConfig, RuntimeConfig, ScoreConfig, config_hash, key_dict, paper_off
from ..data import Record
from ..engines.multi import run_many_in_process
from ..evaluation.controls import fill_to_budget, prefix_for_tokens
from ..evaluation.tasks import Task
from ..io import check_unchanged, file_identity, write_json
from ..locking import folder_lock
from ..pipeline import PipelineConfig, run_warmup
from ..selection import parse_budget, rank
from ..selector import TrimSelector

TRIM_METHODS: tuple[str, ...] = ("trim", "trim-warmup")
WARMUP_METHODS: frozenset[str] = frozenset({"trim-warmup", "less"})
SELECTION_MARKER = "selection.json"  # a selection folder's completion marker: its key
FILL_COLUMNS: tuple[str, ...] = ("log_importance_weight", "gumbel")  # DSIR's score before the min_words filter
TRIM_VARIANTS: tuple[str, ...] = ("trim-generic", "trim-layer-N", "trim-layer-N-generic")  # N: a layer number
GENERIC_ROWS = 10  # generic rows of trim-generic: those of benchmarks/ablations.py (--generic-rows 10)
_VARIANT = re.compile(r"trim(?:-layer-(\d+))?(-generic)?")


def trim_variant(method: str) -> tuple[FingerprintConfig, ScoreConfig] | None:
    """The configs of a TRIM variant method (``trim-generic``, ``trim-layer-N``, ``trim-layer-N-generic``),
    or None when ``method`` is not one (``trim`` itself is not a variant)."""
    m = _VARIANT.fullmatch(method)
    if m is None or method == "trim":
        return None
    layer = None if m.group(1) is None else int(m.group(1))
    return (FingerprintConfig(hidden_layer=layer), ScoreConfig(generic_rows=GENERIC_ROWS if m.group(2) else 0))


def model_identity(spec: str | Path) -> dict[str, Any] | str:
    """A model folder's content identity (a warmup adapter changes when the warmup is redone), else the spec."""
    p = Path(spec)
    return file_identity(p) if p.is_dir() else str(spec)


def shared_warmup(pool: str | Path, out_dir: str | Path, model: str, *, pipeline: PipelineConfig | None = None,
                  progress: bool = True, overwrite: bool = False) -> Path:
    """:func:`~trim_select.pipeline.run_warmup`, the recipe seeded with the pipeline's seed as
    ``trim-select run`` seeds it, trained once; returns its folder."""
    pipeline = pipeline if pipeline is not None else PipelineConfig()
    run_warmup(pool, out_dir, model, replace(pipeline, recipe=replace(pipeline.recipe, seed=pipeline.seed)),
               progress=progress, overwrite=overwrite)
    return Path(out_dir)


def selection_state(out: Path, key: str, outputs: Sequence[Path]) -> str:
    """``done`` when ``out/selection.json`` (written last) holds ``key`` and every one of ``outputs``
    exists, ``stale`` when a finished selection there has another key, else ``absent``."""
    marker = out / SELECTION_MARKER
    if not (marker.exists() and all(p.exists() for p in outputs)):
        return "absent"
    return "done" if json.loads(marker.read_text()).get("key") == key else "stale"


def mark_selection_done(out: Path, key: str, **info: Any) -> None:
    """Write ``out/selection.json``, the completion marker :func:`selection_state` reads."""
    write_json(out / SELECTION_MARKER, {"key": key, **info})


def trim_selections(tasks: Sequence[Task], pool: str | Path, budget: str, out_dir: str | Path, *, model: str | Path,
                    runtime: RuntimeConfig, progress: bool = True, overwrite: bool = False,
                    fingerprint: FingerprintConfig | None = None, scoring: ScoreConfig | None = None
                    ) -> dict[str, Path]:
    """TRIM for every task in one pool pass: ``{task: OUT/<task>/}`` (skipped when done with these inputs);
    ``fingerprint``/``scoring`` configs for a variant (:func:`trim_variant`; default: the defaults)."""
    out = Path(out_dir)
    targets = {t.name: Path(t.path) / "val.jsonl" for t in tasks}
    for path in targets.values():
        if not path.exists():
            raise FileNotFoundError(f"{path}: a task folder needs val.jsonl (the target set) for selection")
    key = config_hash(runtime, {"model": model_identity(model), "pool": file_identity(pool), "budget": budget,
                                "targets": {n: file_identity(p) for n, p in targets.items()},
                                **_configs_key(fingerprint, scoring)})
    dirs = {n: out / n for n in targets}
    if selection_state(out, key, [d / "coreset.jsonl" for d in dirs.values()]) == "done":
        return dirs
    with folder_lock(out, "select"):
        sel = TrimSelector(str(model), runtime=runtime, progress=progress,
                           fingerprint=fingerprint or FingerprintConfig(), scoring=scoring or ScoreConfig())
        report = run_many_in_process(sel, pool, out, {n: budget for n in targets}, targets, overwrite=overwrite)
        report.write(out)
    mark_selection_done(out, key, tasks=sorted(targets))
    return dirs


def _configs_key(fingerprint: FingerprintConfig | None, scoring: ScoreConfig | None) -> dict[str, Any]:
    """The configs in the selection key: a variant's, or the defaults' once a default switches an extension
    on (none while plain ``trim`` has every extension off: its key predates the configs)."""
    configs = [key_dict(fingerprint or FingerprintConfig()), key_dict(scoring or ScoreConfig())]
    if fingerprint is None and scoring is None and configs == [key_dict(paper_off(FingerprintConfig())),
                                                               key_dict(paper_off(ScoreConfig()))]:
        return {}
    return {"configs": configs}


def run_selection(method: str, task: Task, pool: str | Path, budget: str, out_dir: str | Path, *, seed: int,
                  selection_model: str, runtime: RuntimeConfig, progress: bool = True,
                  overwrite: bool = False) -> dict[str, Any]:
    """One baseline selection (skipped when ``out_dir`` holds it with the same settings); its run.json.

    Its key holds the pool's and targets' content digests, so a changed file is never reused; an
    earlier selection there from a file that changed since is refused unless ``overwrite``."""
    from ..baselines import BaselineConfig, run_baseline

    out = Path(out_dir)
    targets = Path(task.path) / "val.jsonl"
    if not targets.exists():
        raise FileNotFoundError(f"{targets}: a task folder needs val.jsonl (the target set) for selection")
    key = config_hash(runtime, {"method": method, "pool": file_identity(pool), "targets": file_identity(targets),
                                "budget": budget, "seed": seed, "model": selection_model})
    state = selection_state(out, key, [out / "coreset.jsonl", out / "run.json"])
    if state == "done":
        return json.loads((out / "run.json").read_text())
    if state == "stale":
        prev = json.loads((out / "run.json").read_text())
        check_unchanged({"pool": prev.get("pool"), "targets": prev.get("targets")},
                        {"pool": file_identity(pool), "targets": file_identity(targets)}, out, overwrite=overwrite)
    report = run_baseline(method, pool, targets, out, budget,
                          config=BaselineConfig(seed=seed, model=selection_model, runtime=runtime),
                          progress=progress, overwrite=True)
    mark_selection_done(out, key, method=method, seed=seed)
    return report


def selection_cost(report: dict[str, Any]) -> dict[str, Any]:
    """Seconds and forward/backward passes of a selection, from its run.json ``cost`` section; a
    selection resumed from finished Stage II parts counts the seconds those parts recorded."""
    c = report["cost"]
    seconds = max(c.get("wall_seconds") or 0.0, c.get("stage2_seconds_all_runs") or 0.0)
    return {"seconds": seconds, "forward_passes": c.get("forward_passes"),
            "backward_passes": c.get("backward_passes"), "tokens": c.get("tokens")}


@dataclass(frozen=True)
class TrainingRows:
    """What one method trains on for one task after the controls, and how it got there."""

    positions: np.ndarray  # pool positions, best first
    info: dict[str, Any]

    def records(self, pool_records: Sequence[Record]) -> list[Record]:
        return [pool_records[int(i)] for i in self.positions]


def external_selection(folder: str | Path, task: str, n_tasks: int) -> Path:
    """The folder holding ``task``'s ``scores.parquet`` inside an external selection ``folder``."""
    base = Path(folder)
    for d in (base / task, *([base] if n_tasks == 1 else [])):
        if (d / "scores.parquet").exists():
            return d
    raise FileNotFoundError(f"{base}: an external selection needs {base / task / 'scores.parquet'}"
                            + (f" (or {base / 'scores.parquet'})" if n_tasks == 1 else ""))


def ranking_of(sel_dir: str | Path, n_pool: int) -> tuple[np.ndarray, np.ndarray]:
    """(ranking best first over every pool position, positions the method itself would select).

    Rows the method cannot select (``-inf``) come last, ordered by their score before the filter
    where the method has one (DSIR's importance weight), so a fill-up takes the best of them."""
    table = pq.read_table(Path(sel_dir) / "scores.parquet")
    index = np.asarray(table.column("index").to_numpy(), dtype=np.int64)
    if len(index) != n_pool or sorted(index.tolist()) != list(range(n_pool)):
        raise ValueError(f"{sel_dir}/scores.parquet does not score every pool row once ({len(index)} of {n_pool})")
    score = np.full(n_pool, -np.inf)
    score[index] = np.asarray(table.column("score").to_numpy(), dtype=np.float64)
    fill = np.zeros(n_pool)
    for col in FILL_COLUMNS:
        if col in table.column_names:
            fill[index] += np.asarray(table.column(col).to_numpy(), dtype=np.float64)
    finite = np.isfinite(score) | (score == np.inf)
    own = rank(score)
    own = own[finite[own]]
    rest = np.flatnonzero(~finite)
    rest = rest[rank(fill[rest])] if rest.size else rest
    return np.concatenate([own, rest]).astype(np.int64), own


def training_rows(ranking: np.ndarray, own: np.ndarray, budget: str, n_pool: int, tokens: np.ndarray, *,
                  exclude: Sequence[int] = (), match_tokens: int | None = None) -> TrainingRows:
    """The controls of the module docstring on one method's ranking (``tokens``: per pool row)."""
    k = parse_budget(budget, n_pool)
    drop = np.zeros(n_pool, dtype=bool)
    drop[np.asarray(list(exclude), dtype=np.int64)] = True
    ranking, own = ranking[~drop[ranking]], own[~drop[own]]
    chosen = fill_to_budget(ranking, own[:k], k)
    info: dict[str, Any] = {"budget_rows": k, "own_rows": int(min(len(own), k)),
                            "filled": int(len(chosen) - min(len(own), k)), "excluded": int(drop.sum())}
    if match_tokens is not None:
        order = np.concatenate([chosen, ranking[~np.isin(ranking, chosen)]])
        chosen = prefix_for_tokens(order, tokens, match_tokens)
        info["matched_tokens"] = int(match_tokens)
    info["rows"] = int(len(chosen))
    info["tokens"] = int(np.asarray(tokens, dtype=np.int64)[chosen].sum())
    return TrainingRows(positions=np.asarray(chosen, dtype=np.int64), info=info)

