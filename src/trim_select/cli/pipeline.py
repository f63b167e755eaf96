"""``trim-select warmup | run``: LoRA warmup and the one-command pipeline (docs/SPEC.md "Warmup")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import WARMUP_FRACTION, RuntimeConfig
from ..engines.multi import parse_budgets, target_sets
from ..training.recipe import LoraRecipe
from . import app
from .common import build_configs, console, friendly_errors
from .core import BudgetMany, TargetsMany, summarise
from .options import (
    CHUNKS,
    CONTROL,
    ENGINE,
    FORWARD,
    RECIPE,
    STAGE_I,
    STAGE_II,
    TOKENS,
    Device,
    Format,
    Model,
    Opt,
    Out,
    Pool,
    TargetFormat,
    Trust,
    field_opt,
    make_recipe,
    pick,
    with_options,
)

Fraction = Annotated[float, typer.Option("--fraction", help="gamma: share of the pool to warm up on (5%).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the subset draw, data order, LoRA init, dropout.")]
# the warmup's own sequence length, dtype and device (`warmup`), or the warmup's inside `run`
WARMUP = [field_opt(LoraRecipe, "max_length", int), field_opt(LoraRecipe, "dtype", str),
          Opt("device", Device, LoraRecipe().device),
          Opt("trust_remote_code", Trust, RuntimeConfig().trust_remote_code)]
RUN_WARMUP = [field_opt(LoraRecipe, "max_length", int, "--warmup-max-length", param="warmup_max_length"),
              field_opt(LoraRecipe, "dtype", str, "--warmup-dtype", param="warmup_dtype")]


@app.command("warmup")
@friendly_errors
@with_options(RECIPE, WARMUP, CONTROL)
def warmup_cmd(pool: Pool, out: Out, model: Model = "default", fraction: Fraction = WARMUP_FRACTION,
               seed: Seed = 0, format: Format = None, **options: Any) -> None:
    """LoRA-fine-tune the model on a seeded random share of the pool (paper Table 7 recipe).

    Writes OUT/checkpoints/step-N/, OUT/final/ (use as --model) and OUT/warmup.json; rerun the same
    command to resume after an interruption.
    """
    from ..warmup import warmup

    control = pick(options, CONTROL)
    trust = options.pop("trust_remote_code")
    recipe = make_recipe(seed=seed, **options)
    res = warmup(pool, out, model, fraction, seed, recipe, format=format, skip_invalid=control["skip_invalid"],
                 progress=not control["quiet"], overwrite=control["overwrite"], trust_remote_code=trust)
    t = res.train
    state = "already complete" if t.cached else "done"
    loss = f"loss {t.losses[0]:.4f} -> {t.losses[-1]:.4f}" if t.losses else ""
    console.print(f"[bold green]warmup {state}[/]: {len(res.subset_ids)} of {res.pool_records} examples, "
                  f"{len(t.history)} steps, {loss}, {t.seconds:.1f}s ({t.tokens_per_s:.0f} tokens/s) "
                  f"-> {res.final}",
                  highlight=False)


@app.command("run")
@friendly_errors
@with_options(RECIPE, RUN_WARMUP, TOKENS, STAGE_I, STAGE_II, FORWARD, CHUNKS, ENGINE, CONTROL)
def run_cmd(
    pool: Pool,
    targets: TargetsMany,
    budget: BudgetMany,
    out: Out,
    model: Model = "default",
    no_warmup: Annotated[bool, typer.Option("--no-warmup", help="Score with the base model (no warmup).")]
    = False,
    checkpoints: Annotated[str, typer.Option(
        "--checkpoints", help="Score with: last (paper default), all, or step-a,step-b; several are combined "
                              "weighted by each checkpoint's learning rate (LESS-style).")] = "last",
    fraction: Fraction = WARMUP_FRACTION,
    seed: Seed = 0,
    format: Format = None,
    target_format: TargetFormat = None,
    **options: Any,
) -> None:
    """Warmup -> Stage I -> Stage II -> selection in one command, each stage cached in OUT.

    OUT/warmup/ holds the warmed adapter (reused by every later run with the same warmup settings),
    OUT/runs/<hash>/ the outputs per target set and selection settings, and OUT/coreset.jsonl,
    scores.parquet, run.json are copies of the latest run. Several --targets: one warmup and one pool
    pass for all, outputs in OUT/targets/<name>/. Rerun the same command after a crash.
    """
    from ..pipeline import PipelineConfig, run_pipeline, run_pipeline_many

    control, where, recipe = pick(options, CONTROL), pick(options, ENGINE), pick(options, RECIPE)
    warm = pick(options, RUN_WARMUP)
    render, fpc, scoring, runtime = build_configs(format=format, **options)
    recipe = make_recipe(seed=seed, **recipe, max_length=warm["warmup_max_length"], dtype=warm["warmup_dtype"],
                         device=runtime.device)
    cfg = PipelineConfig(use_warmup=not no_warmup, fraction=fraction, seed=seed, recipe=recipe,
                         checkpoints=checkpoints)
    if len(targets) > 1 or Path(targets[0]).is_dir() or ("=" in targets[0] and not Path(targets[0]).exists()):
        sets = target_sets(targets)
        top = run_pipeline_many(pool, sets, out, parse_budgets(budget, sets), model=model, pipeline=cfg,
                                render=render, fingerprint=fpc, scoring=scoring, runtime=runtime, format=format,
                                target_format=target_format, skip_invalid=control["skip_invalid"],
                                overwrite=control["overwrite"], progress=not control["quiet"], **where)
        for name, entry in top["targets"].items():
            console.print(f"[bold green]{name}[/]: selected {entry['selected']} of {entry['scored']} -> "
                          f"{out / 'targets' / name}", highlight=False)
        return
    if len(budget) != 1 or "=" in budget[0]:
        raise typer.BadParameter(f"one target set takes one --budget (a count or a share), got {budget}")
    report = run_pipeline(pool, Path(targets[0]), out, budget[0], model=model, pipeline=cfg, render=render,
                          fingerprint=fpc, scoring=scoring, runtime=runtime, format=format,
                          target_format=target_format, skip_invalid=control["skip_invalid"],
                          overwrite=control["overwrite"], progress=not control["quiet"], **where)
    w = report.get("warmup")
    if w:
        console.print(f"warmup {'reused' if w['cached'] else 'trained'}: {len(w['subset_ids'])} examples, "
                      f"{len(w['losses'])} steps, {w['seconds']:.1f}s -> {w['dir']}", highlight=False)
    summarise(report, out)
