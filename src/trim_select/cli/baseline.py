"""``trim-select baseline``: the paper's comparison methods with the output layout of ``select``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import BASELINE, LESS, RENDER, RUNTIME, console, friendly_errors
from .options import BatchTok, Budget, Device, Format, MaxLen, Model, Overwrite, Pool, Quiet, Skip, Targets, Trust

Method = Annotated[str, typer.Option("--method", help="random|bm25|dsir|rds|less.")]
Out = Annotated[Path, typer.Option("--out", help="Output folder (scores.parquet, coreset.jsonl, run.json).")]
Seed = Annotated[int, typer.Option(
    "--seed", help="random: the sample; dsir --dsir-resample: the Gumbel noise; less: projection and "
                   "fresh-LoRA init.")]
DsirNgrams = Annotated[int, typer.Option("--dsir-ngrams", help="dsir: n-gram order (2: uni+bigrams).")]
LoraR = Annotated[int, typer.Option("--lora-r", help="less without checkpoints: fresh LoRA rank.")]
LoraAlpha = Annotated[int, typer.Option("--lora-alpha", help="less without checkpoints: LoRA alpha.")]
PoolGrad = Annotated[str, typer.Option("--pool-gradient", help="less: adam|sgd for pool examples.")]
Checkpoints = Annotated[str, typer.Option(
    "--checkpoints", help="rds/less with a warmup folder as --model: all|last|STEP,STEP (LR-weighted).")]
GroupField = Annotated[str | None, typer.Option(
    "--group-field", help="rds/less: target field naming sub-tasks (mean per sub-task, max over them).")]


@app.command("baseline")
@friendly_errors
def baseline_cmd(
    method: Method,
    pool: Pool,
    targets: Targets,
    budget: Budget,
    out: Out,
    model: Model = "default",
    seed: Seed = 0,
    format: Format = None,
    target_format: Annotated[str | None, typer.Option("--target-format")] = None,
    checkpoints: Checkpoints = BASELINE.checkpoints,
    group_field: GroupField = None,
    bm25_k1: Annotated[float, typer.Option("--bm25-k1", help="bm25: term-frequency saturation.")] = 1.5,
    bm25_b: Annotated[float, typer.Option("--bm25-b", help="bm25: length normalisation.")] = 0.75,
    bm25_stopwords: Annotated[str, typer.Option("--bm25-stopwords",
                                                help="bm25: stopword list (en, ..., none).")] = "en",
    bm25_aggregate: Annotated[str, typer.Option("--bm25-aggregate",
                                                help="bm25: over target queries, max|mean.")] = "max",
    dsir_ngrams: DsirNgrams = 2,
    dsir_buckets: Annotated[int, typer.Option("--dsir-buckets", help="dsir: hash buckets.")] = 10000,
    dsir_resample: Annotated[bool, typer.Option(
        "--dsir-resample/--dsir-top-k",
        help="dsir: seeded importance resampling (Gumbel top-k) instead of top-k by weight.")] = False,
    dsir_min_words: Annotated[int, typer.Option(
        "--dsir-min-words", help="dsir: never select examples with fewer words (package default).")] = 100,
    dsir_num_proc: Annotated[int, typer.Option("--dsir-num-proc", help="dsir: featurisation processes.")] = 1,
    proj_dim: Annotated[int, typer.Option("--proj-dim", help="less: projection dimension.")] = 8192,
    projection: Annotated[str, typer.Option(
        "--projection", help="less: auto|rademacher|gaussian|sjlt (auto: rademacher on GPU or small "
                             "models, sparse JL on CPU).")] = "auto",
    lora_r: LoraR = LESS.lora_r,
    lora_alpha: LoraAlpha = LESS.lora_alpha,
    adam_bias_correction: Annotated[bool, typer.Option(
        "--adam-bias-correction/--less-adam",
        help="less: AdamW bias correction in the Adam-aware gradient (LESS has none).")] = False,
    pool_gradient: PoolGrad = "adam",
    grad_batch: Annotated[int, typer.Option("--grad-batch",
                                            help="less: examples projected together (memory).")] = 16,
    max_length: MaxLen = RENDER.max_length,
    batch_tokens: BatchTok = RUNTIME.batch_tokens,
    device: Device = RUNTIME.device,
    dtype: Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 (less: autocast; "
                                                       "auto = float32 on CPU).")] = "auto",
    skip_invalid: Skip = False,
    trust_remote_code: Trust = RUNTIME.trust_remote_code,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
) -> None:
    """Select with a baseline (random, BM25, DSIR, RDS, LESS): scores.parquet, coreset.jsonl, run.json."""
    from ..baselines import BASELINES, BaselineConfig, method_config, run_baseline
    from ..config import RenderConfig, RuntimeConfig

    if method not in BASELINES:
        raise typer.BadParameter(f"--method must be one of {', '.join(sorted(BASELINES))}")
    settings = {
        "random": {},
        "bm25": {"k1": bm25_k1, "b": bm25_b, "aggregate": bm25_aggregate,
                 "stopwords": None if bm25_stopwords.lower() in ("none", "off", "") else bm25_stopwords},
        "dsir": {"ngrams": dsir_ngrams, "num_buckets": dsir_buckets, "resample": dsir_resample,
                 "min_words": dsir_min_words, "num_proc": dsir_num_proc},
        "rds": {"group_field": group_field},
        "less": {"proj_dim": proj_dim, "projection": projection, "lora_r": lora_r, "lora_alpha": lora_alpha,
                 "bias_correction": adam_bias_correction, "pool_gradient": pool_gradient,
                 "group_field": group_field, "grad_batch": grad_batch},
    }[method]
    try:
        config = BaselineConfig(
            seed=seed, model=model, checkpoints=checkpoints,
            render=RenderConfig(format=format, max_length=max_length),
            runtime=RuntimeConfig(device=device, dtype=dtype, batch_tokens=batch_tokens,
                                  trust_remote_code=trust_remote_code))
        mc = method_config(method, **settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    report = run_baseline(method, pool, targets, out, budget, config=config, method_settings=mc,
                          format=format, target_format=target_format, skip_invalid=skip_invalid,
                          progress=not quiet, overwrite=overwrite)
    _summary(report, out)


def _summary(report: dict, out: Path) -> None:
    c, cost = report["counts"], report["cost"]
    passes = ""
    if cost["forward_passes"] or cost["backward_passes"]:
        passes = (f", {cost['forward_passes']} forward / {cost['backward_passes']} backward passes, "
                  f"{cost['tokens']} tokens")
    console.print(
        f"[bold green]{report['method']} done[/] in {cost['wall_seconds']:.1f}s{passes}: "
        f"scored {c['scored']} (rejected {c['rejected']}), selected {c['selected']} -> {out}",
        highlight=False,
    )
