"""``trim-select merge``: combine the shards of a sharded or distributed run into the final outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import friendly_errors
from .core import summarise


@app.command("merge")
@friendly_errors
def merge_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder the shards wrote to (shards.json, parts/).")],
    budget: Annotated[str | None, typer.Option(
        "--budget", help="Coreset size: a count (1000) or a share (5%). Default: the one given to the "
                         "shard jobs; none: scores only.")] = None,
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

    if budget is None:
        budget = ShardPlan.load(out).extra.get("budget")
    report = merge(out, budget, pool=pool)
    summarise(report, out)
