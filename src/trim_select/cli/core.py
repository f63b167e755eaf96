"""``trim-select select | fingerprint | score``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..engines import dispatch as dist
from ..engines.multi import parse_budgets, target_sets
from ..fingerprints import Fingerprints
from ..selector import TrimSelector
from . import app
from .common import RENDER, build_configs, console, friendly_errors
from .options import (
    CHUNKS,
    CONTROL,
    ENGINE,
    FORWARD,
    SHARD,
    STAGE_I,
    STAGE_II,
    TOKENS,
    Format,
    Model,
    Out,
    Pool,
    TargetFormat,
    Targets,
    pick,
    with_options,
)

TargetsMany = Annotated[list[str], typer.Option(
    "--targets", help="Target examples (5-10 rows of the target task). Repeat it, or give a folder of "
                      "*.jsonl/*.jsonl.gz/*.parquet files, to select for several target sets in one pool pass "
                      "(outputs in OUT/<file stem>/; NAME=FILE names a set).")]
BudgetMany = Annotated[list[str], typer.Option(
    "--budget", help="Coreset size: a count (1000) or a share (5%); with several target sets also "
                     "NAME=SIZE, once per target set.")]


def make_selector(model: str, quiet: bool, **kw: Any):
    render, fpc, scoring, runtime = build_configs(**kw)
    return TrimSelector(model, render=render, fingerprint=fpc, scoring=scoring, runtime=runtime,
                        progress=not quiet)


def execute(sel: Any, pool: Path, out: Path, budget: str | None, *, engine: str, workers: int | None,
            ray_address: str | None, shard: str | None, **kw: Any) -> dict[str, Any] | None:
    """Run selection on the chosen engine; with ``--shard`` score one shard and return None."""
    if shard is None:
        return dist.run(sel, pool, out, budget, engine=engine, workers=workers, ray_address=ray_address, **kw)
    check_shard(engine, workers, ray_address, kw)
    i, n = dist.parse_shard(shard)
    shard_done(dist.run_shard(sel, pool, out, (i, n), budget=budget, **kw), out)
    return None


def check_shard(engine: str, workers: int | None, ray_address: str | None, kw: dict[str, Any]) -> None:
    """Refuse what a ``--shard`` job cannot take; drops ``overwrite`` and ``extra`` from ``kw``."""
    if engine != "local" or workers is not None or ray_address is not None:
        raise typer.BadParameter("--shard runs one process: leave out --engine ray, --workers, --ray-address")
    if kw.pop("overwrite", False):
        raise typer.BadParameter("--overwrite cannot be combined with --shard (concurrent shards would "
                                 "delete each other's parts): delete OUT/parts instead")
    kw.pop("extra", None)


def shard_done(info: dict[str, Any], out: Path) -> None:
    i, n = info["shard"]
    left = info["missing_overall"]
    console.print(f"[bold green]shard {i}/{n} done[/] ({info['chunks']} chunks, {info['seconds']:.1f}s); "
                  + (f"{len(left)} chunks of other shards still missing" if left
                     else f"all chunks scored: trim-select merge {out}"), highlight=False)


def summarise(report: dict[str, Any], out: Path) -> None:
    c = report["counts"]
    console.print(
        f"[bold green]done[/] in {report['timings_s'].get('total', 0):.1f}s: scored {c['scored']} "
        f"(rejected {c['rejected']}, truncated {c['truncated']}, duplicate ids {c['duplicate_ids']}, "
        f"unscorable {c['minus_inf']}), selected {c['selected']} -> {out}",
        highlight=False,
    )


def select_many(sel: Any, pool: Path, out: Path, budgets: list[str], targets: list[str], *, engine: str,
                workers: int | None, ray_address: str | None, shard: str | None, **kw: Any) -> dict[str, Any] | None:
    """Several target sets: one pool pass on the chosen engine, outputs in ``OUT/<name>/``; with
    ``--shard`` score one shard of them all and return None (``trim-select merge OUT`` later)."""
    sets = target_sets(targets)
    per_target = parse_budgets(budgets, sets)
    if shard is not None:
        check_shard(engine, workers, ray_address, kw)
        i, n = dist.parse_shard(shard)
        info = dist.run_shard_many(sel, pool, out, (i, n), budgets=per_target, targets=sets, **kw)
        shard_done(info, out)
        return None
    report = dist.run_many(sel, pool, out, per_target, sets, engine=engine, workers=workers,
                           ray_address=ray_address, **kw)
    summarise_many(report, out)
    return report


def summarise_many(report: dict[str, Any], out: Path) -> None:
    for name, entry in report["targets"].items():
        console.print(f"[bold green]{name}[/]: selected {entry['selected']} of {entry['scored']} -> {out / name}",
                      highlight=False)


@app.command("select")
@friendly_errors
@with_options(TOKENS, STAGE_I, STAGE_II, FORWARD, CHUNKS, CONTROL, ENGINE, SHARD)
def select_cmd(pool: Pool, targets: TargetsMany, budget: BudgetMany, out: Out, model: Model = "default",
               format: Format = None, target_format: TargetFormat = None, **options: Any) -> None:
    """Stage I + Stage II + selection: write coreset.jsonl, scores.parquet, fingerprints, run.json."""
    where = pick(options, ENGINE) | pick(options, SHARD)
    control = pick(options, CONTROL)
    sel = make_selector(model, control.pop("quiet"), format=format, **options)
    if len(targets) > 1 or Path(targets[0]).is_dir() or ("=" in targets[0] and not Path(targets[0]).exists()):
        select_many(sel, pool, out, budget, targets, **where, format=format, target_format=target_format,
                    **control)
        return
    if len(budget) != 1 or "=" in budget[0]:
        raise typer.BadParameter(f"one target set takes one --budget (a count or a share), got {budget}")
    report = execute(sel, pool, out, budget[0], **where, targets=Path(targets[0]), format=format,
                     target_format=target_format, **control)
    if report is not None:
        summarise(report, out)


@app.command("fingerprint")
@friendly_errors
@with_options(TOKENS, STAGE_I, FORWARD)
def fingerprint_cmd(
    targets: Targets,
    out: Annotated[Path, typer.Option("--out", help="Fingerprints file (.safetensors) or folder.")],
    model: Model = "default",
    format: Format = None,
    **options: Any,
) -> None:
    """Stage I only: build fingerprints from the target set and save them (safetensors)."""
    sel = make_selector(model, True, format=format, **options)
    sel.fit(targets, format=format)
    path = out / "fingerprints.safetensors" if out.suffix != ".safetensors" else out
    sel.fingerprints.save(path)
    fp = sel.fingerprints
    console.print(f"[bold green]{len(fp)}[/] token-class fingerprints from {fp.meta['n_targets']} targets "
                  f"({fp.meta['n_target_tokens']} tokens) -> {path}", highlight=False)


@app.command("score")
@friendly_errors
@with_options(STAGE_II, FORWARD, CHUNKS, CONTROL, ENGINE, SHARD)
def score_cmd(
    pool: Pool,
    fingerprints: Annotated[Path, typer.Option("--fingerprints", help="File from `trim-select fingerprint`.")],
    out: Out,
    budget: Annotated[str | None, typer.Option("--budget", help="Also select a coreset of this size.")] = None,
    model: Model = "default",
    format: Format = None,
    **options: Any,
) -> None:
    """Stage II with saved fingerprints (scope, template and hidden-layer settings come from the file)."""
    fp_meta = Fingerprints.load(fingerprints).meta
    meta = fp_meta.get("render", {})
    where = pick(options, ENGINE) | pick(options, SHARD)
    control = pick(options, CONTROL)
    sel = make_selector(model, control.pop("quiet"), format=format, scope=meta.get("scope", RENDER.scope),
                        score_template=meta.get("score_template", RENDER.score_template),
                        hidden_layer=fp_meta.get("hidden_layer"), hidden_fraction=None, **options)
    report = execute(sel, pool, out, budget, **where, fingerprints=fingerprints, format=format, **control)
    if report is not None:
        summarise(report, out)
