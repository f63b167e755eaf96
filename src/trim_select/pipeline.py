"""``trim-select run``: warmup -> Stage I -> Stage II -> selection (paper Algorithm 3), every stage
cached on disk, optionally aggregating scores over several warmup checkpoints weighted by their
learning rate (LESS-style, Xia et al. 2024; paper Appendix G (ii); ``docs/SPEC.md`` "Warmup")."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import WARMUP_FRACTION, FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig, config_hash, to_dict
from .engines.dispatch import execute, execute_many
from .io import atomic_path, check_unchanged, file_identity
from .locking import folder_lock
from .models import resolve_model_path
from .outputs import RunReport
from .selection import parse_budget
from .selector import TrimSelector
from .training.checkpoints import DEFAULT_CHECKPOINTS, Checkpoint, checkpoint_weights, choose_checkpoints
from .training.recipe import LoraRecipe
from .warmup import WarmupResult, warmup


def aggregate_scores(tables: Sequence[Any], weights: Sequence[float]) -> Any:
    """Weighted sum of per-checkpoint score tables (same rows). ``-inf`` stays ``-inf``.

    ``score``, ``mean``, ``max`` and ``coverage`` are combined linearly, so Eq. 15 still holds per row;
    token counts come from the first table (they do not depend on the checkpoint).
    """
    if len(tables) != len(weights) or not tables:
        raise ValueError("one weight per score table needed")
    base = tables[0]
    idx = base.column("index").to_numpy()
    cols: dict[str, Any] = {name: base.column(name) for name in base.column_names}
    for col in ("score", "mean", "max", "coverage"):
        acc = np.zeros(base.num_rows, dtype=np.float64)
        ninf = np.zeros(base.num_rows, dtype=bool)
        for t, w in zip(tables, weights, strict=True):
            if not np.array_equal(t.column("index").to_numpy(), idx):
                raise ValueError("score tables of different checkpoints cover different rows")
            v = t.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            ninf |= np.isneginf(v)
            acc += w * np.where(np.isfinite(v), v, 0.0)
        cols[col] = pa.array(np.where(ninf, -np.inf, acc))
    return pa.table(cols)


@dataclass(frozen=True)
class PipelineConfig:
    """``trim-select run``: what the warmup and the checkpoint aggregation do."""

    use_warmup: bool = True
    fraction: float = WARMUP_FRACTION  # gamma (SPEC "Warmup")
    seed: int = 0  # subset draw and training seed
    recipe: LoraRecipe = field(default_factory=LoraRecipe)
    checkpoints: str = DEFAULT_CHECKPOINTS  # last | all | step-a,step-b (Table 8: last)


def _run_key(pool: str | Path, targets: str | Path, model_id: str, cfg: PipelineConfig, render: RenderConfig,
             fpc: FingerprintConfig, sc: ScoreConfig, rt: RuntimeConfig, ckpt_names: list[str],
             format: str | None, target_format: str | None, skip_invalid: bool) -> str:
    """Identity of one selection run: target *content*, pool, scoring model and settings (not the budget)."""
    return config_hash(render, fpc, sc, {
        "targets": file_identity(targets)["xxh3_128"], "pool": file_identity(pool), "model": model_id,
        "checkpoints": [cfg.checkpoints, *ckpt_names], "chunk": rt.chunk_size, "dtype": rt.dtype,
        "format": format, "target_format": target_format, "skip_invalid": skip_invalid})


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def run_pipeline(
    pool: str | Path,
    targets: str | Path,
    out_dir: str | Path,
    budget: str | int | float,
    *,
    model: str = "default",
    pipeline: PipelineConfig | None = None,
    render: RenderConfig | None = None,
    fingerprint: FingerprintConfig | None = None,
    scoring: ScoreConfig | None = None,
    runtime: RuntimeConfig | None = None,
    format: str | None = None,
    target_format: str | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
) -> RunReport:
    """Algorithm 3 of the paper with every stage cached in ``out_dir``::

        OUT/warmup/                 train_lora/warmup output (skipped when complete, same settings)
        OUT/runs/<key>/             one folder per target set + selection settings (budget excluded):
                                    fingerprints, parts/, scores.parquet, coreset.jsonl, run.json;
                                    with several checkpoints, ckpt/step-NNNNNN/ holds each one's scores
        OUT/run.json, coreset.jsonl, scores.parquet   copies of the latest run's outputs

    A rerun with new targets or budget reuses the warmup (and, same targets, the scores); a crashed
    run resumes (warmup from its last checkpoint, Stage II from its finished chunks). Stage II runs
    on ``engine`` (:func:`trim_select.engines.dispatch.execute`: ``local`` with ``workers``, or ``ray`` at
    ``ray_address``); the engine does not change the scores, so it is not part of the run key.

    ``out_dir`` is locked for the call (:mod:`trim_select.locking`); a pool or targets file whose content
    changed since ``OUT/run.json`` was written is refused unless ``overwrite`` (the warmup checks its pool).
    """
    out = Path(out_dir)
    with folder_lock(out, "run"):
        prev = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        check_unchanged({"pool": prev.get("pool"), "targets": prev.get("targets")},
                        {"pool": file_identity(pool), "targets": file_identity(targets)}, out, overwrite=overwrite)
        return _run_stages(pool, targets, out, budget, model=model, pipeline=pipeline, render=render,
                           fingerprint=fingerprint, scoring=scoring, runtime=runtime, format=format,
                           target_format=target_format, skip_invalid=skip_invalid, overwrite=overwrite,
                           progress=progress, engine=engine, workers=workers, ray_address=ray_address)


def _run_stages(pool: str | Path, targets: str | Path, out: Path, budget: str | int | float, *, model: str,
                pipeline: PipelineConfig | None, render: RenderConfig | None, fingerprint: FingerprintConfig | None,
                scoring: ScoreConfig | None, runtime: RuntimeConfig | None, format: str | None,
                target_format: str | None, skip_invalid: bool, overwrite: bool, progress: bool, engine: str,
                workers: int | None, ray_address: str | None) -> RunReport:
    """:func:`run_pipeline`'s stages, with ``out`` locked and its inputs checked: warmup, scoring, copies."""
    pipeline = pipeline or PipelineConfig()
    render, fingerprint = render or RenderConfig(), fingerprint or FingerprintConfig()
    scoring, runtime = scoring or ScoreConfig(), runtime or RuntimeConfig()
    out.mkdir(parents=True, exist_ok=True)
    parse_budget(budget, 10**15)  # fail fast on a malformed budget, before any training
    t0 = time.perf_counter()
    stage = _warm_stage(pool, out, model, pipeline, runtime, format, skip_invalid, progress, overwrite)
    t_warm = time.perf_counter() - t0
    key = _run_key(pool, targets, stage.model_id, pipeline, render, fingerprint, scoring, runtime,
                   [c.name for c in stage.ckpts], format, target_format, skip_invalid)
    run_dir = out / "runs" / key
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = _run_extra(run_dir, out, targets, pipeline, stage)

    def selector(spec: str) -> TrimSelector:
        return TrimSelector(spec, render=render, fingerprint=fingerprint, scoring=scoring, runtime=runtime,
                            progress=progress)

    kw: dict[str, Any] = {"engine": engine, "workers": workers, "ray_address": ray_address, "targets": targets,
                          "format": format, "target_format": target_format, "skip_invalid": skip_invalid,
                          "overwrite": overwrite}
    if len(stage.models) == 1:
        report = execute(selector(stage.models[0]), pool, run_dir, budget, extra=extra, **kw)
    else:
        tables = []
        for spec, ck in zip(stage.models, stage.ckpts, strict=True):
            sel = selector(spec)
            execute(sel, pool, run_dir / "ckpt" / ck.name, None, **kw).write(run_dir / "ckpt" / ck.name)
            tables.append(pq.read_table(run_dir / "ckpt" / ck.name / "scores.parquet"))
        table = aggregate_scores(tables, stage.weights.tolist())
        fp_src = run_dir / "ckpt" / stage.ckpts[-1].name / "fingerprints.safetensors"
        _copy_atomic(fp_src, run_dir / "fingerprints.safetensors")
        report = sel.finalize(pool, run_dir, table, budget, format=format, extra=extra)
        report.timings["total"] = round(time.perf_counter() - t0 - t_warm, 3)
    report.timings["warmup_stage"] = round(t_warm, 3)
    report.timings["pipeline_total"] = round(time.perf_counter() - t0, 3)
    report.write(run_dir)  # once, by this top-level call
    for name in ("coreset.jsonl", "scores.parquet", "fingerprints.safetensors", "run.json"):
        if (run_dir / name).exists():
            _copy_atomic(run_dir / name, out / name)
    return report


@dataclass(frozen=True)
class _WarmStage:
    """What the warmup stage hands to scoring: the models to score with and how to weight them."""

    warm: WarmupResult | None
    ckpts: list[Checkpoint]
    weights: np.ndarray
    models: list[str]
    model_id: str  # identity of the scoring model(s) in the run key


def run_warmup(pool: str | Path, out_dir: str | Path, model: str, pipeline: PipelineConfig,
               runtime: RuntimeConfig = RuntimeConfig(), *, format: str | None = None, skip_invalid: bool = False,
               progress: bool = True, overwrite: bool = False) -> WarmupResult:
    """The warmup of ``trim-select run`` in ``out_dir``: the pipeline's fraction, seed and recipe (its
    device ``auto`` taking the runtime's), trained once and reused when complete (``compare`` too)."""
    recipe = replace(pipeline.recipe, device=pipeline.recipe.device if pipeline.recipe.device != "auto"
                     else runtime.device)
    return warmup(pool, out_dir, model, pipeline.fraction, pipeline.seed, recipe, format=format,
                  skip_invalid=skip_invalid, progress=progress, overwrite=overwrite,
                  trust_remote_code=runtime.trust_remote_code)


def _warm_stage(pool: str | Path, out: Path, model: str, pipeline: PipelineConfig, runtime: RuntimeConfig,
                format: str | None, skip_invalid: bool, progress: bool, overwrite: bool) -> _WarmStage:
    """The warmup (cached when complete) and the checkpoints to score with, or the plain model."""
    if not pipeline.use_warmup:
        if pipeline.checkpoints != "last":
            raise ValueError("--checkpoints needs a warmup (drop --no-warmup)")
        return _WarmStage(None, [], np.zeros(0), [model], str(resolve_model_path(model).resolve()))
    warm = run_warmup(pool, out / "warmup", model, pipeline, runtime, format=format, skip_invalid=skip_invalid,
                      progress=progress, overwrite=overwrite)
    ckpts = choose_checkpoints(out / "warmup", pipeline.checkpoints)
    weights = checkpoint_weights(ckpts) if len(ckpts) > 1 else np.ones(1)
    last_only = pipeline.checkpoints == "last"
    models = [str(out / "warmup" / "final")] if last_only else [str(c.path) for c in ckpts]
    model_id = json.loads((out / "warmup" / "warmup.json").read_text())["key"]
    return _WarmStage(warm, ckpts, weights, models, model_id)


def _run_extra(run_dir: Path, out: Path, targets: str | Path, pipeline: PipelineConfig,
               stage: _WarmStage) -> dict[str, Any]:
    """The ``run.json`` fields ``trim-select run`` adds to the selection report."""
    warm = stage.warm
    return {
        "command": "run",
        "run_dir": str(run_dir),
        "pipeline": {"use_warmup": pipeline.use_warmup, "fraction": pipeline.fraction, "seed": pipeline.seed,
                     "checkpoints": pipeline.checkpoints, "targets": str(Path(targets).resolve())},
        "warmup": None if warm is None else {
            "dir": str(out / "warmup"), "cached": warm.train.cached, "subset_ids": list(warm.subset_ids),
            "subset_indices": list(warm.subset_indices), "recipe": to_dict(warm.train.recipe),
            "losses": warm.train.losses, "seconds": round(warm.train.seconds, 3), "tokens": warm.train.tokens,
            "tokens_per_s": round(warm.train.tokens_per_s, 2), "base": warm.train.base},
        "checkpoints": [dict(c.to_dict(), weight=float(w)) for c, w in zip(stage.ckpts, stage.weights,
                                                                           strict=True)],
    }


def run_pipeline_many(pool: str | Path, targets: Mapping[str, Path], out_dir: str | Path,
                      budgets: Mapping[str, Any], *, model: str = "default", pipeline: PipelineConfig | None = None,
                      render: RenderConfig | None = None, fingerprint: FingerprintConfig | None = None,
                      scoring: ScoreConfig | None = None, runtime: RuntimeConfig | None = None,
                      format: str | None = None, target_format: str | None = None, skip_invalid: bool = False,
                      overwrite: bool = False, progress: bool = True, engine: str = "local",
                      workers: int | None = None, ray_address: str | None = None) -> RunReport:
    """:func:`run_pipeline` for several target sets: one warmup, then one pool pass for all of them.

    ``OUT/warmup/`` as for one target set; ``OUT/targets/<name>/`` holds what a single-target ``select``
    with the warmed model on the same engine writes (:func:`~trim_select.engines.dispatch.execute_many`;
    resumable, each target's scores reused while its inputs are unchanged), ``OUT/targets/run.json`` the
    shared cost. Several target sets score with one model: the last checkpoint (Table 8's default).
    """

    out = Path(out_dir)
    pipeline = pipeline or PipelineConfig()
    if pipeline.checkpoints != "last":
        raise ValueError("several target sets score with the warmup's last checkpoint only: drop --checkpoints, "
                         "or run one target set per command")
    with folder_lock(out, "run --targets (several)"):
        out.mkdir(parents=True, exist_ok=True)
        for budget in budgets.values():
            parse_budget(budget, 10**15)  # fail fast on a malformed budget, before any training
        runtime = runtime or RuntimeConfig()
        stage = _warm_stage(pool, out, model, pipeline, runtime, format, skip_invalid, progress, overwrite)
        sel = TrimSelector(stage.models[0], render=render or RenderConfig(),
                           fingerprint=fingerprint or FingerprintConfig(), scoring=scoring or ScoreConfig(),
                           runtime=runtime, progress=progress)
        extra = _run_extra(out / "targets", out, next(iter(targets.values())), pipeline, stage)
        extra["pipeline"]["targets"] = {name: str(Path(p).resolve()) for name, p in targets.items()}
        top = execute_many(sel, pool, out / "targets", budgets, targets, engine=engine, workers=workers,
                           ray_address=ray_address, format=format, target_format=target_format,
                           skip_invalid=skip_invalid, overwrite=overwrite, extra=extra)
        top.write(out / "targets")
    return top
