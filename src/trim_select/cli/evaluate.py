"""``trim-select evaluate | compare``: fine-tune on a coreset and score task folders; compare methods."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from . import app
from .common import console, friendly_errors
from .options import Budget, Device, Model, Opt, Overwrite, Pool, Quiet, with_options

Tasks = Annotated[list[Path], typer.Option(
    "--task", help="Task folder with test.jsonl (+ dev.jsonl exemplars, val.jsonl targets); repeatable.")]
Seeds = Annotated[int, typer.Option(
    "--seeds", help="Fine-tuning seeds 0..N-1 (0: untuned reference rows only).")]
Limit = Annotated[int | None, typer.Option(
    "--limit", help="Evaluate a seeded random subset of N test rows (the same rows for every model).")]
LimitSeed = Annotated[int, typer.Option("--limit-seed", help="Seed of the --limit subset.")]
Shots = Annotated[int | None, typer.Option(
    "--shots", help="Exemplars from dev.jsonl as chat turns (default: 5 multiple choice, 4 math).")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Math: greedy decoding budget per answer.")]
Generate = Annotated[bool, typer.Option(
    "--generate/--no-generate",
    help="Math: greedy decoding for exact match (--no-generate: answer loss only).")]
Merge = Annotated[bool, typer.Option(
    "--merge-adapter/--unmerged-adapter",
    help="Evaluate fine-tuned models with the LoRA merged into the weights (faster; in bf16 the rounding of "
         "W + BA blurs small effects) or kept apart (default).")]
GenBatch = Annotated[int, typer.Option("--gen-batch-size", help="Math: prompts per generation batch.")]
EvalBatchTok = Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per log-likelihood batch.")]
EvalDtype = Annotated[str, typer.Option(
    "--dtype", help="Evaluation dtype: auto (bf16 where supported)|float32|bfloat16.")]
Baseline = Annotated[bool, typer.Option("--baseline/--no-baseline",
                                        help="Also score the untuned base model (reference row).")]
# fine-tuning recipe (CPU-sized defaults; the paper's Table 7: --epochs 4 --lr 2e-5 --batch-size 64
# --lora-r 128 --lora-alpha 512)
Epochs = Annotated[int, typer.Option("--epochs", help="Fine-tuning epochs.")]
Lr = Annotated[float, typer.Option("--lr", help="AdamW learning rate.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Effective batch in examples.")]
LoraR = Annotated[int, typer.Option("--lora-r", help="LoRA rank.")]
LoraAlpha = Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha.")]
LoraDropout = Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout.")]
TrainMaxLen = Annotated[int, typer.Option("--train-max-length", help="Truncate training sequences.")]
TrainDtype = Annotated[str, typer.Option(
    "--train-dtype",
    help="Autocast while fine-tuning: auto (bf16 where the CPU/GPU supports it)|float32|bf16.")]
LmEvalTask = Annotated[list[str] | None, typer.Option(
    "--lm-eval-task", help="Also evaluate with lm-eval: a task folder, an lm-eval task name or a directory of "
                           "lm-eval task YAMLs; repeatable. Writes OUT/lm_eval.json.")]
LmEvalInclude = Annotated[Path | None, typer.Option(
    "--lm-eval-include", help="Directory of extra lm-eval task YAMLs for --lm-eval-task names.")]
MicroTok = Annotated[int, typer.Option("--micro-batch-tokens", help="Padded tokens per forward/backward.")]


# what evaluate and compare share: how tasks are scored and the fine-tuning recipe (CPU-sized defaults)
EVAL = [Opt("limit", Limit, None), Opt("limit_seed", LimitSeed, 0), Opt("shots", Shots, None),
        Opt("max_new_tokens", MaxNew, 256), Opt("generate", Generate, True), Opt("merge_adapter", Merge, False),
        Opt("gen_batch_size", GenBatch, 16), Opt("batch_tokens", EvalBatchTok, 8192), Opt("epochs", Epochs, 2),
        Opt("lr", Lr, 1e-4), Opt("batch_size", BatchSize, 8), Opt("lora_r", LoraR, 16),
        Opt("lora_alpha", LoraAlpha, 64), Opt("lora_dropout", LoraDropout, 0.1),
        Opt("train_max_length", TrainMaxLen, 2048), Opt("train_dtype", TrainDtype, "auto"),
        Opt("micro_batch_tokens", MicroTok, 4096), Opt("device", Device, "auto"), Opt("dtype", EvalDtype, "auto")]


def _configs(*, device: str, dtype: str, limit: int | None, limit_seed: int, shots: int | None,
             max_new_tokens: int, generate: bool, merge_adapter: bool, gen_batch_size: int,
             batch_tokens: int, epochs: int, lr: float, batch_size: int, lora_r: int, lora_alpha: int,
             lora_dropout: float, train_max_length: int, train_dtype: str,
             micro_batch_tokens: int) -> tuple[Any, Any]:
    """(EvalConfig, LoraRecipe) from CLI values; bad values become a usage error."""
    from ..evaluation import EvalConfig, evaluation_recipe

    try:
        config = EvalConfig(shots=shots, limit=limit, limit_seed=limit_seed, max_new_tokens=max_new_tokens,
                            generate=generate, merge_adapter=merge_adapter, gen_batch_size=gen_batch_size,
                            batch_tokens=batch_tokens, device=device, dtype=dtype)
        overrides: dict[str, Any] = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "lora_r": lora_r,
                                     "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                                     "max_length": train_max_length, "micro_batch_tokens": micro_batch_tokens}
        if train_dtype != "auto":
            overrides["dtype"] = train_dtype
        recipe = evaluation_recipe(device, **overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return config, recipe


@app.command("evaluate")
@friendly_errors
@with_options(EVAL)
def evaluate_cmd(
    task: Tasks,
    train: Annotated[Path | None, typer.Option(
        "--train",
        help="Coreset to fine-tune on: a jsonl file or a selection folder (coreset.jsonl).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output folder (default: <train folder>/evaluation). Resumable.")] = None,
    model: Model = "default",
    seeds: Seeds = 3,
    baseline: Baseline = True,
    baseline_model: Annotated[list[str] | None, typer.Option(
        "--baseline-model", help="Another untuned model to score as a reference row; repeatable.")] = None,
    lm_eval_task: LmEvalTask = None,
    lm_eval_include: LmEvalInclude = None,
    quiet: Quiet = False,
    **options: Any,
) -> None:
    """LoRA-fine-tune the model on a coreset (per seed) and score task folders; base model as reference.

    Multiple choice: accuracy by summed and by length-normalised log-likelihood. Math: exact match of
    greedy decoding. Both: the gold answer's per-token NLL. Writes OUT/evaluation.json and .md.
    """
    from ..evaluation import evaluate

    config, recipe = _configs(**options)
    if seeds < 0:
        raise typer.BadParameter("--seeds must be >= 0")
    if out is None:
        if train is None:
            raise typer.BadParameter("give --out (no --train folder to put the evaluation in)")
        out = (train if train.is_dir() else train.parent) / "evaluation"
    summary = evaluate(task, out, train=train, model=model, seeds=seeds, baseline=baseline,
                       baseline_models=baseline_model or (), recipe=recipe, config=config, progress=not quiet)
    typer.echo(summary["markdown"])
    if lm_eval_task:
        _lm_eval(lm_eval_task, lm_eval_include, out, model=model, baseline=baseline, config=config)
    console.print(f"[bold green]done[/] -> {out / 'evaluation.json'}, {out / 'evaluation.md'}", highlight=False)


def _lm_eval(tasks: list[str], include: Path | None, out: Path, *, model: str, baseline: bool,
             config: Any) -> None:
    """lm-eval on every fine-tuned adapter under OUT/train (and the base model): OUT/lm_eval.json."""
    import json

    from ..evaluation.lm_eval_tasks import run_lm_eval
    from ..evaluation.runner import load_finetuned
    from ..models import load_model

    targets: list[tuple[str, Any]] = [(str(a.parent.name), a) for a in sorted(out.glob("train/*/final"))]
    if baseline or not targets:
        targets.insert(0, ("base", None))
    report: dict[str, Any] = {}
    for label, adapter in targets:
        loaded = (load_model(model, device=config.device, dtype=config.dtype) if adapter is None
                  else load_finetuned(adapter, config))
        for task in tasks:
            res = run_lm_eval(loaded.model, loaded.tokenizer, task, limit=config.limit, shots=config.shots,
                              include=include)
            report.setdefault(label, {}).update(res["results"])
            for name, metrics in res["results"].items():
                shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
                typer.echo(f"lm-eval {label} {name}: {shown}")
    (out / "lm_eval.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


@app.command("compare")
@friendly_errors
@with_options(EVAL)
def compare_cmd(
    task: Tasks,
    pool: Pool,
    budget: Budget,
    out: Annotated[Path, typer.Option("--out", help="Output folder (resumable: rerun the same command).")],
    methods: Annotated[str, typer.Option(
        "--methods",
        help="Comma list: trim and any baseline (random, bm25, dsir, rds, less).")] = "trim,bm25,random",
    seeds: Annotated[int, typer.Option("--seeds", help="Fine-tuning seeds 0..N-1 per method.")] = 3,
    model: Model = "default",
    selection_model: Annotated[str | None, typer.Option(
        "--selection-model", help="Model that selects (default: --model). A warmup folder gives TRIM its "
                                  "final adapter and LESS its checkpoints.")] = None,
    baseline: Baseline = True,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
    **options: Any,
) -> None:
    """Select with each method, fine-tune and evaluate each x seeds: one table like the paper's Table 1.

    Beside the metrics: selection cost (seconds, forward/backward passes) and the coreset's source mix
    and mean token length. Writes OUT/compare.json and OUT/compare.md.
    """
    from ..config import RuntimeConfig
    from ..evaluation import compare

    config, recipe = _configs(**options)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    summary = compare(task, pool, budget, method_list, out, seeds=seeds, model=model,
                      selection_model=selection_model, recipe=recipe, config=config,
                      runtime=RuntimeConfig(device=options["device"]), baseline=baseline, progress=not quiet,
                      overwrite=overwrite)
    typer.echo(summary["markdown"])
    console.print(f"[bold green]done[/] -> {out / 'compare.json'}, {out / 'compare.md'}", highlight=False)
