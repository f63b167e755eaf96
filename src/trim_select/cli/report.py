"""``trim-select report DIR [DIR ...] --out REPORT_DIR``: figures and one HTML page comparing coresets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import console, friendly_errors


@app.command("report")
@friendly_errors
def report_cmd(
    dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Output folders of `select`, `score --budget` or `baseline`.", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Report folder (index.html, PNGs, summary.json).")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Model for the token view and tokenizer lengths (default: the one in run.json)."
        ),
    ] = None,
    targets: Annotated[
        Path | None,
        typer.Option("--targets", help="Target file: the token view shows its saliency α per token."),
    ] = None,
    pool: Annotated[
        Path | None,
        typer.Option(
            "--pool", help="Pool file, when it moved since the runs (default: the path in run.json)."
        ),
    ] = None,
    token_view: Annotated[
        bool,
        typer.Option(
            "--token-view/--no-token-view",
            help="Token view of targets and top/bottom candidates (loads the model).",
        ),
    ] = True,
    examples: Annotated[
        int, typer.Option("--examples", help="Top and bottom candidates in the token view.")
    ] = 3,
    n_targets: Annotated[int, typer.Option("--n-targets", help="Target examples in the token view.")] = 10,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens shown per example.")] = 768,
    link_figures: Annotated[
        bool, typer.Option("--link-figures", help="Link the PNGs instead of embedding them in the page.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N.")] = "auto",
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Default: the dtype recorded in run.json.")
    ] = None,
    title: Annotated[str, typer.Option("--title", help="Page title.")] = "trim-select report",
) -> None:
    """Compare coresets: length distribution, source mix, score histograms, overlap and a token view."""
    from ..reports import ReportConfig, build_report

    try:
        cfg = ReportConfig(
            model=model,
            targets=targets,
            pool=pool,
            token_view=token_view,
            n_examples=examples,
            n_targets=n_targets,
            max_tokens=max_tokens,
            device=device,
            dtype=dtype,
            embed_figures=not link_figures,
            title=title,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = build_report(dirs, out, cfg)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"[bold green]report[/] ({len(result.figures)} figures) -> {result.html}", highlight=False)
