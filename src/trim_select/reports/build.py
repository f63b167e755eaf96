"""Driver: load -> stats -> figures -> token view -> HTML (:func:`build_report`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_path, write_json
from .config import ReportConfig
from .figures import figure_lengths, figure_overlap, figure_scores, figure_source_mix, figure_task_mix
from .html import render_html
from .load import load_pools, load_run, run_folders, unique_labels
from .stats import compute_summary
from .tokens import TokenView, build_token_view, recorded_targets

# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class ReportResult:
    """Paths written by :func:`build_report` and the summary numbers."""

    html: Path
    figures: dict[str, Path]
    summary: dict[str, Any]
    notes: list[str]


def build_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, cfg: ReportConfig = ReportConfig()
) -> ReportResult:
    """Read the runs, compute the statistics, draw the figures and write ``index.html``,
    ``summary.json`` and the PNGs into ``out_dir`` (every file atomically)."""
    if not run_dirs:
        raise ValueError("give at least one output folder of select/baseline")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d, cfg.pool) for d in run_folders(run_dirs)]  # a multi-target OUT: each target
    unique_labels(runs)
    pools = load_pools(runs, cfg)
    notes = [p.note for p in pools.values() if p.note]
    summary = compute_summary(runs, pools, cfg)
    figures: dict[str, Path | None] = {
        "lengths": figure_lengths(runs, pools, out / "lengths.png"),
        "source_mix": figure_source_mix(summary, out / "source_mix.png"),
        "task_mix": figure_task_mix(summary, out / "task_mix.png", cfg.top_tasks),
        "scores": figure_scores(runs, out / "scores.png"),
        "overlap": figure_overlap(summary, out / "overlap.png"),
    }
    views: list[TokenView] = []
    if cfg.token_view:
        cache: dict[str, Any] = {}
        hint = next((t for t in (recorded_targets(r.info) for r in runs) if t), None)
        for r in runs:
            v = build_token_view(r, pools[r.pool_key], cfg, cache, hint)
            if r.fingerprints_path is None:
                notes.extend(v.notes)
            else:
                views.append(v)
    summary["token_view"] = [
        {
            "run": v.run,
            "targets": len(v.targets),
            "top": len(v.top),
            "bottom": len(v.bottom),
            "notes": v.notes,
        }
        for v in views
    ]
    summary["figures"] = {k: v.name for k, v in figures.items() if v is not None}
    summary["notes"] = notes
    page = render_html(summary, runs, pools, figures, views, notes, out, cfg)
    html_path = out / "index.html"
    with atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    write_json(out / "summary.json", summary)
    return ReportResult(
        html=html_path,
        figures={k: v for k, v in figures.items() if v is not None},
        summary=summary,
        notes=notes,
    )
