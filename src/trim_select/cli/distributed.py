"""``trim-select merge``: combine the shards of a sharded or distributed run into the final outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..locking import folder_lock
from . import app
from .common import friendly_errors
from .core import summarise, summarise_many


@app.command("merge")
@friendly_errors
def merge_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder the shards wrote to (shards.json, parts/).")],
    budget: Annotated[str | None, typer.Option(
        "--budget", help="Coreset size: a count (1000) or a share (5%); several target sets: one for all "
                         "or NAME=SIZE,NAME2=SIZE. Default: the one given to the shard jobs; none: scores only.")]
    = None,
    pool: Annotated[Path | None, typer.Option(
        "--pool", help="The pool file, if it moved since scoring (default: its path in shards.json).")]
    = None,
) -> None:
    """Check that every chunk was scored (names the missing ones), then write scores.parquet,
    coreset.jsonl and run.json exactly as a single-process run does.

    For shards from `trim-select score|select --shard i/n` (e.g. Slurm array jobs) or a run of
    `--engine local|ray` whose driver was stopped before the end.
    """
    from ..engines.base import ShardPlan, merge
    from ..engines.multi import MULTI_PLAN_FILE, merge_many, parse_budgets

    if (out / MULTI_PLAN_FILE).exists():  # several target sets: merge each OUT/<name>/, then OUT/run.json
        names = list(json.loads((out / MULTI_PLAN_FILE).read_text())["targets"])
        with folder_lock(out, "merge --targets (several)"):
            top = merge_many(out, None if budget is None else parse_budgets(budget.split(","), names), pool=pool)
            top.write(out)
        summarise_many(top, out)
        return
    if budget is None:
        budget = ShardPlan.load(out).extra.get("budget")
    report = merge(out, budget, pool=pool)
    summarise(report, out)
