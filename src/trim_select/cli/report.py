"""``trim-select report DIR [DIR ...] --out REPORT_DIR``: figures and one HTML page comparing coresets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..reports import ReportConfig, build_report
from . import app
from .common import console, friendly_errors
from .options import field_opt, with_options

# the report's settings, each from its ReportConfig field (doc and default written once there)
REPORT = [field_opt(ReportConfig, name, tp, *flags) for name, tp, flags in (
    ("model", str | None, ()), ("targets", Path | None, ()), ("pool", Path | None, ()),
    ("token_view", bool, ("--token-view/--no-token-view",)), ("n_examples", int, ("--examples",)),
    ("n_targets", int, ()), ("max_tokens", int, ()), ("device", str, ()), ("dtype", str | None, ()),
    ("title", str, ()))]


@app.command("report")
@friendly_errors
@with_options(REPORT)
def report_cmd(
    dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Output folders of `select`, `score --budget` or `baseline` (a several-targets `select` "
                 "folder: each target).", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Report folder (index.html, PNGs, summary.json).")],
    link_figures: Annotated[
        bool, typer.Option("--link-figures", help="Link the PNGs instead of embedding them in the page.")
    ] = False,
    **options: Any,
) -> None:
    """Compare coresets: length distribution, source mix, score histograms, overlap and a token view."""
    try:
        cfg = ReportConfig(embed_figures=not link_figures, **options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = build_report(dirs, out, cfg)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"[bold green]report[/] ({len(result.figures)} figures) -> {result.html}", highlight=False)
