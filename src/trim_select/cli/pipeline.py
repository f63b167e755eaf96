"""``trim-select warmup | run``: LoRA warmup and the one-command pipeline (docs/SPEC.md "Warmup")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import app
from .common import (
    FP,
    LORA_TARGETS,
    PENALTY,
    RECIPE,
    RENDER,
    RUNTIME,
    SCORE,
    WARMUP_FRACTION,
    build_configs,
    console,
    friendly_errors,
)
from .core import (
    BatchTok,
    Budget,
    Chunk,
    ColW,
    CovW,
    Device,
    Engine,
    Format,
    Idf,
    Layers,
    MaxLen,
    MaxW,
    MeanW,
    Model,
    Out,
    Overwrite,
    Penalty,
    Pool,
    Quiet,
    RayAddress,
    RowW,
    Scope,
    ScoreTemplate,
    Skip,
    Targets,
    Trust,
    Workers,
    summarise,
)

if TYPE_CHECKING:
    from ..training.lora import LoraRecipe

# -- warmup recipe options (Table 7 defaults live in LoraRecipe) ---------------------------------
Fraction = Annotated[float, typer.Option("--fraction", help="gamma: share of the pool to warm up on (5%).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the subset draw, data order, LoRA init, dropout.")]
Epochs = Annotated[int, typer.Option("--epochs", help="Warmup epochs (Table 7).")]
Lr = Annotated[float, typer.Option("--lr", help="AdamW learning rate (Table 7).")]
WarmupRatio = Annotated[float, typer.Option("--warmup-ratio", help="Linear LR warmup share (Table 7).")]
Schedule = Annotated[str, typer.Option("--schedule", help="linear|constant after the LR warmup.")]
LoraR = Annotated[int, typer.Option("--lora-r", help="LoRA rank (Table 7).")]
LoraAlpha = Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha (Table 7).")]
LoraDropout = Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout (Table 7).")]
LoraTargets = Annotated[str, typer.Option("--lora-targets", help="Comma list of module names to adapt.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Effective batch in examples (Table 7).")]
MicroTok = Annotated[int, typer.Option("--micro-batch-tokens",
                                       help="Padded tokens per forward/backward (memory; not the math).")]
MicroSize = Annotated[int, typer.Option("--micro-batch-size",
                                        help="Max sequences per micro-batch; 0: auto (1 on CPU: no padding "
                                             "mask, faster and leaner; token budget only on GPU).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
SaveSteps = Annotated[int, typer.Option("--save-steps", help="Checkpoint every N steps (0: every epoch).")]
GradCkpt = Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations (memory).")]
TrainDtype = Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPUs that support it, float32 on CPU)"
                                                        "|float32|bf16 (autocast; weights stay float32).")]


def make_recipe(*, lora_targets: str, **fields: Any) -> LoraRecipe:
    """A :class:`~trim_select.warmup.LoraRecipe` from CLI values (bad values -> a usage error)."""
    from ..training.lora import LoraRecipe

    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    try:
        return LoraRecipe(target_modules=targets, **fields)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("warmup")
@friendly_errors
def warmup_cmd(
    pool: Pool,
    out: Out,
    model: Model = "default",
    fraction: Fraction = WARMUP_FRACTION,
    seed: Seed = 0,
    format: Format = None,
    epochs: Epochs = RECIPE.epochs,
    lr: Lr = RECIPE.lr,
    warmup_ratio: WarmupRatio = RECIPE.warmup_ratio,
    schedule: Schedule = RECIPE.schedule,
    lora_r: LoraR = RECIPE.lora_r,
    lora_alpha: LoraAlpha = RECIPE.lora_alpha,
    lora_dropout: LoraDropout = RECIPE.lora_dropout,
    lora_targets: LoraTargets = LORA_TARGETS,
    batch_size: BatchSize = RECIPE.batch_size,
    micro_batch_tokens: MicroTok = RECIPE.micro_batch_tokens,
    micro_batch_size: MicroSize = RECIPE.micro_batch_size,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate training sequences.")] = 2048,
    weight_decay: WeightDecay = RECIPE.weight_decay,
    save_steps: SaveSteps = RECIPE.save_steps,
    gradient_checkpointing: GradCkpt = RECIPE.gradient_checkpointing,
    dtype: TrainDtype = RECIPE.dtype,
    device: Device = RUNTIME.device,
    skip_invalid: Skip = False,
    overwrite: Overwrite = False,
    trust_remote_code: Trust = RUNTIME.trust_remote_code,
    quiet: Quiet = False,
) -> None:
    """LoRA-fine-tune the model on a seeded random share of the pool (paper Table 7 recipe).

    Writes OUT/checkpoints/step-N/, OUT/final/ (use as --model) and OUT/warmup.json; rerun the same
    command to resume after an interruption.
    """
    from ..warmup import warmup

    recipe = make_recipe(seed=seed, epochs=epochs, lr=lr, warmup_ratio=warmup_ratio, schedule=schedule,
                         lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_targets=lora_targets, batch_size=batch_size,
                         micro_batch_tokens=micro_batch_tokens, micro_batch_size=micro_batch_size,
                         max_length=max_length, weight_decay=weight_decay, save_steps=save_steps,
                         gradient_checkpointing=gradient_checkpointing, dtype=dtype, device=device)
    res = warmup(pool, out, model, fraction, seed, recipe, format=format, skip_invalid=skip_invalid,
                 progress=not quiet, overwrite=overwrite, trust_remote_code=trust_remote_code)
    t = res.train
    state = "already complete" if t.cached else "done"
    loss = f"loss {t.losses[0]:.4f} -> {t.losses[-1]:.4f}" if t.losses else ""
    console.print(f"[bold green]warmup {state}[/]: {len(res.subset_ids)} of {res.pool_records} examples, "
                  f"{len(t.history)} steps, {loss}, {t.seconds:.1f}s ({t.tokens_per_s:.0f} tokens/s) "
                  f"-> {res.final}",
                  highlight=False)


@app.command("run")
@friendly_errors
def run_cmd(
    pool: Pool,
    targets: Targets,
    budget: Budget,
    out: Out,
    model: Model = "default",
    no_warmup: Annotated[bool, typer.Option("--no-warmup", help="Score with the base model (no warmup).")]
    = False,
    checkpoints: Annotated[str, typer.Option(
        "--checkpoints", help="Score with: last (paper default), all, or step-a,step-b; several are combined "
                              "weighted by each checkpoint's learning rate (LESS-style).")] = "last",
    fraction: Fraction = WARMUP_FRACTION,
    seed: Seed = 0,
    epochs: Epochs = RECIPE.epochs,
    lr: Lr = RECIPE.lr,
    warmup_ratio: WarmupRatio = RECIPE.warmup_ratio,
    schedule: Schedule = RECIPE.schedule,
    lora_r: LoraR = RECIPE.lora_r,
    lora_alpha: LoraAlpha = RECIPE.lora_alpha,
    lora_dropout: LoraDropout = RECIPE.lora_dropout,
    lora_targets: LoraTargets = LORA_TARGETS,
    batch_size: BatchSize = RECIPE.batch_size,
    micro_batch_tokens: MicroTok = RECIPE.micro_batch_tokens,
    micro_batch_size: MicroSize = RECIPE.micro_batch_size,
    warmup_max_length: Annotated[int, typer.Option("--warmup-max-length", help="Truncate warmup sequences.")]
    = 2048,
    weight_decay: WeightDecay = RECIPE.weight_decay,
    save_steps: SaveSteps = RECIPE.save_steps,
    gradient_checkpointing: GradCkpt = RECIPE.gradient_checkpointing,
    warmup_dtype: Annotated[str, typer.Option(
        "--warmup-dtype",
        help="Warmup autocast: auto (bf16 on GPUs that support it, float32 on CPU)|float32|bf16.")]
    = "auto",
    format: Format = None,
    target_format: Annotated[str | None, typer.Option("--target-format")] = None,
    scope: Scope = RENDER.scope,
    score_template: ScoreTemplate = RENDER.score_template,
    layers: Layers = FP.layers,
    row_weight: RowW = FP.row_weight,
    col_weight: ColW = FP.col_weight,
    penalty: Penalty = PENALTY,
    mean_weight: MeanW = SCORE.mean_weight,
    max_weight: MaxW = SCORE.max_weight,
    coverage_weight: CovW = SCORE.coverage_weight,
    idf: Idf = SCORE.idf,
    max_length: MaxLen = RENDER.max_length,
    batch_tokens: BatchTok = RUNTIME.batch_tokens,
    chunk_size: Chunk = RUNTIME.chunk_size,
    device: Device = RUNTIME.device,
    dtype: Annotated[str, typer.Option("--dtype", help="Scoring dtype: auto|float32|bfloat16|float16.")]
    = "auto",
    engine: Engine = "local",
    workers: Workers = None,
    ray_address: RayAddress = None,
    skip_invalid: Skip = False,
    overwrite: Overwrite = False,
    trust_remote_code: Trust = RUNTIME.trust_remote_code,
    quiet: Quiet = False,
) -> None:
    """Warmup -> Stage I -> Stage II -> selection in one command, each stage cached in OUT.

    OUT/warmup/ holds the warmed adapter (reused by every later run with the same warmup settings),
    OUT/runs/<hash>/ the outputs per target set and selection settings, and OUT/coreset.jsonl,
    scores.parquet, run.json are copies of the latest run. Rerun the same command after a crash.
    """
    from ..pipeline import PipelineConfig, run_pipeline

    render, fpc, scoring, runtime = build_configs(
        format=format, scope=scope, max_length=max_length, score_template=score_template, layers=layers,
        row_weight=row_weight, col_weight=col_weight, penalty=penalty, mean_weight=mean_weight,
        max_weight=max_weight, coverage_weight=coverage_weight, idf=idf, device=device, dtype=dtype,
        batch_tokens=batch_tokens, chunk_size=chunk_size, trust_remote_code=trust_remote_code)
    recipe = make_recipe(seed=seed, epochs=epochs, lr=lr, warmup_ratio=warmup_ratio, schedule=schedule,
                         lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_targets=lora_targets, batch_size=batch_size,
                         micro_batch_tokens=micro_batch_tokens, micro_batch_size=micro_batch_size,
                         max_length=warmup_max_length, weight_decay=weight_decay, save_steps=save_steps,
                         gradient_checkpointing=gradient_checkpointing, dtype=warmup_dtype, device=device)
    cfg = PipelineConfig(use_warmup=not no_warmup, fraction=fraction, seed=seed, recipe=recipe,
                         checkpoints=checkpoints)
    report = run_pipeline(pool, targets, out, budget, model=model, pipeline=cfg, render=render,
                          fingerprint=fpc, scoring=scoring, runtime=runtime, format=format,
                          target_format=target_format, skip_invalid=skip_invalid, overwrite=overwrite,
                          progress=not quiet, engine=engine, workers=workers, ray_address=ray_address)
    w = report.get("warmup")
    if w:
        console.print(f"warmup {'reused' if w['cached'] else 'trained'}: {len(w['subset_ids'])} examples, "
                      f"{len(w['losses'])} steps, {w['seconds']:.1f}s -> {w['dir']}", highlight=False)
    summarise(report, out)
