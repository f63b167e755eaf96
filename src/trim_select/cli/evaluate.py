"""``trim-select evaluate | compare``: fine-tune on a coreset and score task folders; compare methods."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..comparison import compare
from ..config import RuntimeConfig
from ..evaluation import EvalConfig, evaluate, evaluation_recipe
from ..evaluation.runner import CPU_RECIPE
from ..training.recipe import LoraRecipe
from . import app
from .common import console, friendly_errors
from .options import Budget, Model, Opt, Overwrite, Pool, Quiet, field_opt, with_options

Tasks = Annotated[list[Path], typer.Option(
    "--task", help="Task folder with test.jsonl (+ dev.jsonl exemplars, val.jsonl targets); repeatable.")]
Seeds = Annotated[int, typer.Option(
    "--seeds", help="Fine-tuning seeds 0..N-1 (0: untuned reference rows only).")]
Baseline = Annotated[bool, typer.Option("--baseline/--no-baseline",
                                        help="Also score the untuned base model (reference row).")]
LmEvalTask = Annotated[list[str] | None, typer.Option(
    "--lm-eval-task", help="Also evaluate with lm-eval: a task folder, an lm-eval task name or a directory of "
                           "lm-eval task YAMLs; repeatable. Writes OUT/lm_eval.json.")]
LmEvalInclude = Annotated[Path | None, typer.Option(
    "--lm-eval-include", help="Directory of extra lm-eval task YAMLs for --lm-eval-task names.")]

# what evaluate and compare share: how tasks are scored (EvalConfig fields) ...
SCORING = [field_opt(EvalConfig, name, tp, *flags) for name, tp, flags in (
    ("limit", int | None, ()), ("limit_seed", int, ()), ("shots", int | None, ()), ("max_new_tokens", int, ()),
    ("generate", bool, ("--generate/--no-generate",)),
    ("merge_adapter", bool, ("--merge-adapter/--unmerged-adapter",)), ("gen_batch_size", int, ()),
    ("batch_tokens", int, ()), ("device", str, ()), ("dtype", str, ()))]
# ... and the fine-tuning recipe, CPU-sized (evaluation.runner.CPU_RECIPE; the paper's Table 7 is
# --epochs 4 --lr 2e-5 --batch-size 64 --lora-r 128 --lora-alpha 512)
TRAINING = [Opt(name, Annotated[tp, typer.Option(flag, help=text)], default) for name, tp, flag, text, default in (
    ("epochs", int, "--epochs", "Fine-tuning epochs.", CPU_RECIPE["epochs"]),
    ("lr", float, "--lr", "AdamW learning rate.", CPU_RECIPE["lr"]),
    ("batch_size", int, "--batch-size", "Effective batch in examples.", CPU_RECIPE["batch_size"]),
    ("lora_r", int, "--lora-r", "LoRA rank.", CPU_RECIPE["lora_r"]),
    ("lora_alpha", int, "--lora-alpha", "LoRA alpha.", CPU_RECIPE["lora_alpha"]),
    ("lora_dropout", float, "--lora-dropout", "LoRA dropout.", CPU_RECIPE["lora_dropout"]),
    ("train_max_length", int, "--train-max-length", "Truncate training sequences.", LoraRecipe().max_length),
    ("train_dtype", str, "--train-dtype", "Autocast while fine-tuning: auto (bf16 where the CPU/GPU supports "
     "it)|float32|bf16.", "auto"),
    ("micro_batch_tokens", int, "--micro-batch-tokens", "Padded tokens per forward/backward.",
     LoraRecipe().micro_batch_tokens))]


def _configs(options: dict[str, Any]) -> tuple[EvalConfig, LoraRecipe]:
    """(EvalConfig, LoraRecipe) from the SCORING and TRAINING options; bad values become a usage error."""
    train = {o.name: options[o.name] for o in TRAINING}
    train["max_length"] = train.pop("train_max_length")
    if train.pop("train_dtype") != "auto":
        train["dtype"] = options["train_dtype"]
    try:
        config = EvalConfig(**{o.name: options[o.name] for o in SCORING})
        recipe = evaluation_recipe(config.device, **train)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return config, recipe


@app.command("evaluate")
@friendly_errors
@with_options(SCORING, TRAINING)
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
    config, recipe = _configs(options)
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


def _external_selections(items: list[str]) -> dict[str, Path]:
    """``--selection NAME=DIR`` items as ``{NAME: DIR}`` (each name once)."""
    external: dict[str, Path] = {}
    for item in items:
        name, sep, folder = (part.strip() for part in item.partition("="))
        if not (sep and name and folder):
            raise typer.BadParameter(f"--selection {item!r}: expected NAME=DIR")
        if name in external:
            raise typer.BadParameter(f"--selection {name!r} given twice")
        external[name] = Path(folder)
    return external


ORDER_HELP = ("A/A noise floor: also train this method's rows in a shuffled order (rows labelled METHOD~shuffled); "
              "its gap to METHOD is what the training order alone moves.")


@app.command("compare")
@friendly_errors
@with_options(SCORING, TRAINING)
def compare_cmd(
    task: Tasks,
    pool: Pool,
    budget: Budget,
    out: Annotated[Path, typer.Option("--out", help="Output folder (resumable: rerun the same command).")],
    methods: Annotated[str, typer.Option(
        "--methods",
        help="Comma list: trim, trim-warmup, the TRIM extensions trim-generic, trim-layer-N (e.g. trim-layer-20), "
             "trim-layer-N-generic (docs/SPEC.md \"Extensions\"), and any baseline (random, bm25, dsir, rds, "
             "less; trim-warmup and LESS share one warmup, trained once).")] = "trim,bm25,random",
    seeds: Annotated[int, typer.Option("--seeds", help="Fine-tuning seeds 0..N-1 per method.")] = 3,
    seed: Annotated[list[int] | None, typer.Option(
        "--seed", help="Run only this seed (repeatable; replaces --seeds' 0..N-1): split a run across machines "
                       "or sessions and join the outputs with `trim-select compare-merge`.")] = None,
    model: Model = "default",
    selection_model: Annotated[str | None, typer.Option(
        "--selection-model", help="Model that selects and is warmed up (default: --model).")] = None,
    lm_eval_limit: Annotated[int, typer.Option(
        "--lm-eval-limit", help="Also score the first N of the --limit rows through lm-eval (acc / exact "
                                "match per row; 0: skip).")] = 0,
    lm_eval_batch_size: Annotated[int, typer.Option(
        "--lm-eval-batch-size", help="Requests per lm-eval forward (decoding is far faster batched).")] = 8,
    match_tokens: Annotated[str | None, typer.Option(
        "--match-tokens", help="Also train every other method on its ranking's prefix with this method's "
                               "token total (rows labelled METHOD@REF-tokens).")] = None,
    order_control: Annotated[str | None, typer.Option("--order-control", help=ORDER_HELP)] = None,
    decontaminate: Annotated[bool, typer.Option(
        "--decontaminate", help="Drop pool rows whose word 13-grams overlap a test row of the task (they "
                                "are listed in compare.json either way).")] = False,
    selection: Annotated[list[str] | None, typer.Option(
        "--selection", help="NAME=DIR: also train and score an external ranking as method NAME, read from "
                            "DIR/<task>/scores.parquet (index and score columns, as `select` writes; "
                            "DIR/scores.parquet with one task). Repeatable.")] = None,
    baseline: Baseline = True,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
    **options: Any,
) -> None:
    """Select with each method, fine-tune and evaluate each x seeds; pair the methods on the test rows.

    Per method: answer NLL, accuracy, selection cost and the coreset's source mix and length; per
    pair of methods: the mean per-row difference with a 95% paired bootstrap interval (seeds
    averaged per row). --limit sizes the NLL rows (a few hundred: no decoding needed). Writes
    OUT/compare.json, OUT/compare.md and OUT/rows/<task>.jsonl.gz after every finished (task,
    method, seed); rerun the same command to resume.
    """
    config, recipe = _configs(options)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    external = _external_selections(selection or [])
    if seed is not None and (len(set(seed)) != len(seed) or min(seed) < 0):
        raise typer.BadParameter(f"--seed {seed}: expected distinct seeds >= 0")
    compare(task, pool, budget, method_list, out, seeds=seed if seed else seeds, model=model,
            selection_model=selection_model, recipe=recipe, config=config, lm_eval_limit=lm_eval_limit,
            lm_eval_batch_size=lm_eval_batch_size, match_tokens=match_tokens, order_control=order_control,
            selections=external, decontaminate=decontaminate,
            runtime=RuntimeConfig(device=config.device, dtype=config.dtype), baseline=baseline,
            progress=not quiet, overwrite=overwrite)
    typer.echo((out / "compare.md").read_text(encoding="utf-8"))
    console.print(f"[bold green]done[/] -> {out / 'compare.json'}, {out / 'compare.md'}", highlight=False)


@app.command("compare-merge")
@friendly_errors
def compare_merge_cmd(
    parts: Annotated[list[Path], typer.Argument(help="compare output folders of one experiment (>= 2).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the joined compare.json, compare.md, rows/.")],
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="Largest |answer NLL difference| allowed where two parts scored the same "
                            "(task, method, seed, row), e.g. on two machines.")] = 1e-3,
) -> None:
    """Join compare outputs split by --seed or --methods (same pool, tasks, recipe and settings, checked)
    into one paired comparison."""
    from ..comparison.merge import merge_compares

    merge_compares(parts, out, tolerance=tolerance)
    typer.echo((out / "compare.md").read_text(encoding="utf-8"))
    console.print(f"[bold green]joined {len(parts)} parts[/] -> {out / 'compare.json'}", highlight=False)
