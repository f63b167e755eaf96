"""``trim-select select | fingerprint | score``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..engines import dispatch as dist
from ..engines.multi import MULTI_ENGINE_ERROR, parse_budgets, run_many_in_process, target_sets
from ..fingerprints import Fingerprints
from ..selector import TrimSelector
from . import app
from .common import FP, PENALTY, RENDER, RUNTIME, SCORE, build_configs, console, friendly_errors

Pool = Annotated[Path, typer.Option("--pool", help="Pool file (.jsonl/.jsonl.gz/.json/.parquet/datasets folder).")]
Targets = Annotated[Path, typer.Option("--targets", help="Target examples (5-10 rows of the target task).")]
TargetsMany = Annotated[list[str], typer.Option(
    "--targets", help="Target examples (5-10 rows of the target task). Repeat it, or give a folder of "
                      "*.jsonl/*.jsonl.gz/*.parquet files, to select for several target sets in one pool pass "
                      "(outputs in OUT/<file stem>/; NAME=FILE names a set).")]
BudgetMany = Annotated[list[str], typer.Option(
    "--budget", help="Coreset size: a count (1000) or a share (5%); with several target sets also "
                     "NAME=SIZE, once per target set.")]
Out = Annotated[Path, typer.Option("--out", help="Output folder (resumable: rerun the same command).")]
Budget = Annotated[str, typer.Option("--budget", help="Coreset size: a count (1000) or a share (5%).")]
Model = Annotated[str, typer.Option("--model", help="'default' (SmolLM2-135M-Instruct), HF folder, .gguf, "
                                                   "or LoRA adapter folder.")]
Format = Annotated[str | None, typer.Option("--format", help="messages|sharegpt|alpaca|prompt_response|text "
                                                           "(default: auto-detect).")]
Scope = Annotated[str, typer.Option("--scope", help="Tokens that are fingerprinted and scored: all|prompt|response.")]
ScoreTemplate = Annotated[bool, typer.Option(
    "--score-template/--content-only",
    help="With --scope all: --score-template also scores chat-template scaffolding (role headers, default "
         "system prompt) as the exact spec does; the default --content-only scores message content only.")]
Layers = Annotated[int, typer.Option("--layers", help="L: attention of the last L layers (Eq. 3, 5).")]
RowW = Annotated[float, typer.Option("--row-weight", help="w_Q (Eq. 7).")]
ColW = Annotated[float, typer.Option("--col-weight", help="w_K (Eq. 7).")]
Penalty = Annotated[str, typer.Option("--penalty", help="lambda for unseen tokens (Eq. 12), or 'none'.")]
MeanW = Annotated[float, typer.Option("--mean-weight", help="w_mu (Eq. 15).")]
MaxW = Annotated[float, typer.Option("--max-weight", help="w_m (Eq. 15).")]
CovW = Annotated[float, typer.Option("--coverage-weight", help="eta (Eq. 15).")]
Idf = Annotated[bool, typer.Option("--idf/--no-idf", help="Extension: IDF-weighted mean term.")]
MaxLen = Annotated[int, typer.Option("--max-length", help="Truncate sequences (scope-aware).")]
BatchTok = Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per forward batch (bounds memory).")]
Chunk = Annotated[int, typer.Option("--chunk-size", help="Examples per resumable scoring chunk.")]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16.")]
Skip = Annotated[bool, typer.Option("--skip-invalid", help="Skip bad rows (counted, written to rejected.jsonl) "
                                                          "instead of stopping.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Discard partial results from other settings.")]
Trust = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model folder.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
Engine = Annotated[str, typer.Option(
    "--engine", help="Stage II engine. local: this machine, one worker per visible GPU (--workers N CPU "
                     "processes without GPUs); ray: a Ray Data pipeline (pip install 'trim-select[ray]').")]
Workers = Annotated[int | None, typer.Option(
    "--workers", help="Workers (local) or actors (ray); default: one per GPU, else 1.")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster to join (auto, ray://HEAD:10001); default: start a local Ray.")]
Shard = Annotated[str | None, typer.Option(
    "--shard", help="i/n: score only chunks k with k % n == i (e.g. Slurm array task i of n), "
                    "then combine with `trim-select merge OUT`.")]


def make_selector(model: str, quiet: bool, **kw: Any):
    render, fpc, scoring, runtime = build_configs(**kw)
    return TrimSelector(model, render=render, fingerprint=fpc, scoring=scoring, runtime=runtime,
                        progress=not quiet)


def execute(sel: Any, pool: Path, out: Path, budget: str | None, *, engine: str, workers: int | None,
            ray_address: str | None, shard: str | None, **kw: Any) -> dict[str, Any] | None:
    """Run selection on the chosen engine; with ``--shard`` score one shard and return None."""
    if shard is None:
        return dist.run(sel, pool, out, budget, engine=engine, workers=workers, ray_address=ray_address, **kw)
    if engine != "local" or workers is not None or ray_address is not None:
        raise typer.BadParameter("--shard runs one process: leave out --engine ray, --workers, --ray-address")
    if kw.pop("overwrite", False):
        raise typer.BadParameter("--overwrite cannot be combined with --shard (concurrent shards would "
                                 "delete each other's parts): delete OUT/parts instead")
    kw.pop("extra", None)
    i, n = dist.parse_shard(shard)
    info = dist.run_shard(sel, pool, out, (i, n), budget=budget, **kw)
    left = info["missing_overall"]
    console.print(f"[bold green]shard {i}/{n} done[/] ({info['chunks']} chunks, {info['seconds']:.1f}s); "
                  + (f"{len(left)} chunks of other shards still missing" if left
                     else f"all chunks scored: trim-select merge {out}"), highlight=False)
    return None


def summarise(report: dict[str, Any], out: Path) -> None:
    c = report["counts"]
    console.print(
        f"[bold green]done[/] in {report['timings_s'].get('total', 0):.1f}s: scored {c['scored']} "
        f"(rejected {c['rejected']}, truncated {c['truncated']}, duplicate ids {c['duplicate_ids']}, "
        f"unscorable {c['minus_inf']}), selected {c['selected']} -> {out}",
        highlight=False,
    )


def select_many(sel: Any, pool: Path, out: Path, budgets: list[str], targets: list[str], *, engine: str,
                workers: int | None, ray_address: str | None, shard: str | None, **kw: Any) -> dict[str, Any]:
    """Several target sets: one pool pass on the in-process engine, outputs in ``OUT/<name>/``."""
    if engine != "local" or workers is not None or ray_address is not None or shard is not None:
        raise typer.BadParameter(f"{MULTI_ENGINE_ERROR}: leave out --engine ray, --workers, --ray-address "
                                 "and --shard, or run one target set per command")
    sets = target_sets(targets)
    report = run_many_in_process(sel, pool, out, parse_budgets(budgets, sets), sets, **kw)
    report.write(out)
    for name, entry in report["targets"].items():
        console.print(f"[bold green]{name}[/]: selected {entry['selected']} of {entry['scored']} -> {out / name}",
                      highlight=False)
    return report


@app.command("select")
@friendly_errors
def select_cmd(
    pool: Pool,
    targets: TargetsMany,
    budget: BudgetMany,
    out: Out,
    model: Model = "default",
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
    dtype: Dtype = RUNTIME.dtype,
    skip_invalid: Skip = False,
    overwrite: Overwrite = False,
    trust_remote_code: Trust = RUNTIME.trust_remote_code,
    quiet: Quiet = False,
    engine: Engine = "local",
    workers: Workers = None,
    ray_address: RayAddress = None,
    shard: Shard = None,
) -> None:
    """Stage I + Stage II + selection: write coreset.jsonl, scores.parquet, fingerprints, run.json."""
    sel = make_selector(model, quiet, format=format, scope=scope, max_length=max_length,
                        score_template=score_template, layers=layers, row_weight=row_weight,
                        col_weight=col_weight, penalty=penalty, mean_weight=mean_weight, max_weight=max_weight,
                        coverage_weight=coverage_weight, idf=idf, device=device, dtype=dtype,
                        batch_tokens=batch_tokens, chunk_size=chunk_size, trust_remote_code=trust_remote_code)
    if len(targets) > 1 or Path(targets[0]).is_dir() or ("=" in targets[0] and not Path(targets[0]).exists()):
        select_many(sel, pool, out, budget, targets, engine=engine, workers=workers, ray_address=ray_address,
                    shard=shard, format=format, target_format=target_format, skip_invalid=skip_invalid,
                    overwrite=overwrite)
        return
    if len(budget) != 1 or "=" in budget[0]:
        raise typer.BadParameter(f"one target set takes one --budget (a count or a share), got {budget}")
    report = execute(sel, pool, out, budget[0], engine=engine, workers=workers, ray_address=ray_address,
                     shard=shard, targets=Path(targets[0]), format=format, target_format=target_format,
                     skip_invalid=skip_invalid, overwrite=overwrite)
    if report is not None:
        summarise(report, out)


@app.command("fingerprint")
@friendly_errors
def fingerprint_cmd(
    targets: Targets,
    out: Annotated[Path, typer.Option("--out", help="Fingerprints file (.safetensors) or folder.")],
    model: Model = "default",
    format: Format = None,
    scope: Scope = RENDER.scope,
    score_template: ScoreTemplate = RENDER.score_template,
    layers: Layers = FP.layers,
    row_weight: RowW = FP.row_weight,
    col_weight: ColW = FP.col_weight,
    max_length: MaxLen = RENDER.max_length,
    batch_tokens: BatchTok = RUNTIME.batch_tokens,
    device: Device = RUNTIME.device,
    dtype: Dtype = RUNTIME.dtype,
    trust_remote_code: Trust = RUNTIME.trust_remote_code,
) -> None:
    """Stage I only: build fingerprints from the target set and save them (safetensors)."""
    sel = make_selector(model, True, format=format, scope=scope, max_length=max_length,
                        score_template=score_template, layers=layers, row_weight=row_weight,
                        col_weight=col_weight, device=device, dtype=dtype, batch_tokens=batch_tokens,
                        trust_remote_code=trust_remote_code)
    sel.fit(targets, format=format)
    path = out / "fingerprints.safetensors" if out.suffix != ".safetensors" else out
    sel.fingerprints.save(path)
    fp = sel.fingerprints
    console.print(f"[bold green]{len(fp)}[/] token-class fingerprints from {fp.meta['n_targets']} targets "
                  f"({fp.meta['n_target_tokens']} tokens) -> {path}", highlight=False)


@app.command("score")
@friendly_errors
def score_cmd(
    pool: Pool,
    fingerprints: Annotated[Path, typer.Option("--fingerprints", help="File from `trim-select fingerprint`.")],
    out: Out,
    budget: Annotated[str | None, typer.Option("--budget", help="Also select a coreset of this size.")] = None,
    model: Model = "default",
    format: Format = None,
    penalty: Penalty = PENALTY,
    mean_weight: MeanW = SCORE.mean_weight,
    max_weight: MaxW = SCORE.max_weight,
    coverage_weight: CovW = SCORE.coverage_weight,
    idf: Idf = SCORE.idf,
    max_length: MaxLen = RENDER.max_length,
    batch_tokens: BatchTok = RUNTIME.batch_tokens,
    chunk_size: Chunk = RUNTIME.chunk_size,
    device: Device = RUNTIME.device,
    dtype: Dtype = RUNTIME.dtype,
    skip_invalid: Skip = False,
    overwrite: Overwrite = False,
    trust_remote_code: Trust = RUNTIME.trust_remote_code,
    quiet: Quiet = False,
    engine: Engine = "local",
    workers: Workers = None,
    ray_address: RayAddress = None,
    shard: Shard = None,
) -> None:
    """Stage II with saved fingerprints (scope and template settings come from the file)."""
    meta = Fingerprints.load(fingerprints).meta.get("render", {})
    sel = make_selector(model, quiet, format=format, scope=meta.get("scope", RENDER.scope),
                        max_length=max_length, score_template=meta.get("score_template", RENDER.score_template),
                        penalty=penalty, mean_weight=mean_weight, max_weight=max_weight,
                        coverage_weight=coverage_weight, idf=idf, device=device, dtype=dtype,
                        batch_tokens=batch_tokens, chunk_size=chunk_size, trust_remote_code=trust_remote_code)
    report = execute(sel, pool, out, budget, engine=engine, workers=workers, ray_address=ray_address,
                     shard=shard, fingerprints=fingerprints, format=format, skip_invalid=skip_invalid,
                     overwrite=overwrite)
    if report is not None:
        summarise(report, out)
