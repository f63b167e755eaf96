"""``trim-select baseline``: the paper's comparison methods with the output layout of ``select``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..baselines import (
    BASELINES,
    BaselineConfig,
    BM25Config,
    DSIRConfig,
    LESSConfig,
    RDSConfig,
    method_config,
    run_baseline,
)
from ..config import RenderConfig, RuntimeConfig
from . import app
from .common import RENDER, RUNTIME, console, friendly_errors
from .options import (
    BatchTok,
    Budget,
    Device,
    Format,
    MaxLen,
    Model,
    Opt,
    Overwrite,
    Pool,
    Quiet,
    Skip,
    TargetFormat,
    Targets,
    Trust,
    field_opt,
    with_options,
)

Method = Annotated[str, typer.Option("--method", help="random|bm25|dsir|rds|less.")]
Out = Annotated[Path, typer.Option("--out", help="Output folder (scores.parquet, coreset.jsonl, run.json).")]

# each method's settings: its config fields, flags prefixed with the method's name where they clash
GROUP_FIELD = field_opt(RDSConfig, "group_field", str | None, prefix="rds/less: ")
METHODS: dict[str, list[Opt]] = {
    "random": [],
    "bm25": [field_opt(BM25Config, name, tp, f"--bm25-{name}", param=f"bm25_{name}", prefix="bm25: ", default=d)
             for name, tp, d in (("k1", float, BM25Config().k1), ("b", float, BM25Config().b),
                                 ("stopwords", str, BM25Config().stopwords or "none"),
                                 ("aggregate", str, BM25Config().aggregate))],
    "dsir": [field_opt(DSIRConfig, name, tp, *flags, param=f"dsir_{name}", prefix="dsir: ") for name, tp, flags in (
        ("ngrams", int, ("--dsir-ngrams",)), ("num_buckets", int, ("--dsir-buckets",)),
        ("resample", bool, ("--dsir-resample/--dsir-top-k",)), ("min_words", int, ("--dsir-min-words",)),
        ("num_proc", int, ("--dsir-num-proc",)))],
    "rds": [GROUP_FIELD],
    "less": [
        *(field_opt(LESSConfig, name, tp, prefix="less: ") for name, tp in (
            ("proj_dim", int), ("projection", str), ("lora_r", int), ("lora_alpha", int))),
        field_opt(LESSConfig, "bias_correction", bool, "--adam-bias-correction/--less-adam",
                  param="adam_bias_correction", prefix="less: "),
        field_opt(LESSConfig, "pool_gradient", str, prefix="less: "),
        field_opt(LESSConfig, "grad_batch", int, prefix="less: "),
        field_opt(LESSConfig, "allow_no_warmup", bool, "--less-allow-no-warmup", param="less_allow_no_warmup",
                  prefix="less: "),
        GROUP_FIELD,
    ],
}
SETTINGS = list({o.name: o for group in METHODS.values() for o in group}.values())  # each option once
SHARED = [
    field_opt(BaselineConfig, "seed", int),
    field_opt(BaselineConfig, "checkpoints", str),
    Opt("max_length", MaxLen, RENDER.max_length),
    Opt("batch_tokens", BatchTok, RUNTIME.batch_tokens),
    Opt("device", Device, RUNTIME.device),
    Opt("dtype", Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 (less: autocast; "
                                                             "auto = float32 on CPU).")], RUNTIME.dtype),
    Opt("trust_remote_code", Trust, RUNTIME.trust_remote_code),
]


def settings_of(method: str, options: dict[str, Any]) -> Any:
    """The method's config from its options (``--bm25-stopwords none``: keep every word)."""
    values = {o.field: options[o.name] for o in METHODS[method]}
    if method == "bm25" and str(values["stopwords"]).lower() in ("none", "off", ""):
        values["stopwords"] = None
    return method_config(method, **values)


@app.command("baseline")
@friendly_errors
@with_options(SHARED, SETTINGS)
def baseline_cmd(method: Method, pool: Pool, targets: Targets, budget: Budget, out: Out, model: Model = "default",
                 format: Format = None, target_format: TargetFormat = None, skip_invalid: Skip = False,
                 quiet: Quiet = False, overwrite: Overwrite = False, **options: Any) -> None:
    """Select with a baseline (random, BM25, DSIR, RDS, LESS): scores.parquet, coreset.jsonl, run.json."""
    if method not in BASELINES:
        raise typer.BadParameter(f"--method must be one of {', '.join(sorted(BASELINES))}")
    try:
        config = BaselineConfig(
            seed=options["seed"], model=model, checkpoints=options["checkpoints"],
            render=RenderConfig(format=format, max_length=options["max_length"]),
            runtime=RuntimeConfig(device=options["device"], dtype=options["dtype"],
                                  batch_tokens=options["batch_tokens"], trust_remote_code=options["trust_remote_code"]))
        mc = settings_of(method, options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    report = run_baseline(method, pool, targets, out, budget, config=config, method_settings=mc, format=format,
                          target_format=target_format, skip_invalid=skip_invalid, progress=not quiet,
                          overwrite=overwrite)
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
