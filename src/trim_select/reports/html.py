"""HTML: one self-contained page from the summary, figures and token view.

The markup lives in Jinja2 templates shipped with the package (``reports/templates``: the page
``report.html.j2``, the token view ``token_view.html.j2``, shared ``macros.html.j2`` and
``report.css``); this module only turns the report's data into the values those templates show.
Every ``{{ value }}`` is escaped on output (pool text is untrusted); the only markup is the
templates' own.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ..data import Record
from .config import ReportConfig
from .load import PoolData, RunData
from .tokens import TokenRow, TokenView

ALPHA_RGB = (235, 120, 0)
MATCH_RGB = (30, 100, 220)


def escape_value(x: Any) -> Markup:
    """Every ``{{ value }}`` of the templates passes here: markup built by the templates themselves
    (a macro's output) stays, anything else is escaped with the standard library's entities."""
    if isinstance(x, Markup):
        return x
    return Markup(html.escape(str(x), quote=True))


def fmt_value(x: Any, digits: int = 3) -> str:
    """A number as the report shows it (``–`` for missing/NaN, thousands separators on counts)."""
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if math.isinf(x):
            return "−inf" if x < 0 else "inf"
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


ENV = Environment(
    loader=PackageLoader("trim_select.reports", "templates"),
    autoescape=select_autoescape(("html", "html.j2")),
    finalize=escape_value,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["num"] = fmt_value


class Table(NamedTuple):
    """A table for the ``table`` macro: header, rows, and which columns are right-aligned numbers."""

    head: list[str]
    rows: list[list[Any]]
    num: list[bool]


@dataclass(frozen=True)
class Scale:
    """The colour scale of one token-view section (its legend and the spans' backgrounds)."""

    lo: float
    hi: float
    rgb: tuple[int, int, int]
    symbol: str

    def colour(self, alpha: str) -> str:
        return f"rgba({self.rgb[0]},{self.rgb[1]},{self.rgb[2]},{alpha})"

    def legend(self) -> dict[str, str]:
        return {"symbol": self.symbol, "lo": f"{self.lo:.3f}", "hi": f"{self.hi:.3f}",
                "c0": self.colour("0.06"), "c1": self.colour("0.9")}


# --------------------------------------------------------------------------------------------
# Token view
# --------------------------------------------------------------------------------------------


def token_cell(tok: str, tid: int, value: float, active: bool, note: str, scale: Scale, *, is_max: bool,
               is_template: bool) -> dict[str, str]:
    """One token of the view: classes, background (its value on the scale) and tooltip."""
    tip = f"{scale.symbol}={value:.4f}" if active else note
    if active and note:
        tip += f" · {note}"
    if is_template:
        tip += " · chat-template scaffolding (not message content)"
    tip += f" · token {tok!r} (id {tid})"
    cls = ["tok"]
    style = ""
    if active:
        span = scale.hi - scale.lo
        v = 0.0 if span <= 0 else min(max((value - scale.lo) / span, 0.0), 1.0)
        style = f"background:{scale.colour(f'{0.06 + 0.84 * v:.3f}')}"
        cls += (["unseen"] if note else []) + (["max"] if is_max else [])
    else:
        cls.append("off")
    if is_template:
        cls.append("tpl")
    return {"cls": " ".join(cls), "style": style, "tip": tip, "shown": tok.replace("\n", "↵\n") if tok else "∅"}


def value_range(rows: Sequence[TokenRow]) -> tuple[float, float]:
    """The lowest and highest counted, finite value over ``rows`` (0..1 when there is none)."""
    vals = [v for r in rows for v, a in zip(r.values, r.active, strict=True) if a and math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    return float(min(vals)), float(max(vals))


def highest_tokens(r: TokenRow, k: int = 8) -> tuple[str, str]:
    """The ``k`` distinct token strings with the highest value (message content only when known)."""
    content = bool(r.template)
    best: dict[str, float] = {}
    for j, (v, a) in enumerate(zip(r.values, r.active, strict=True)):
        if a and math.isfinite(v) and not (content and r.template[j]):
            best[r.tokens[j]] = max(v, best.get(r.tokens[j], -math.inf))
    top = sorted(best.items(), key=lambda kv: -kv[1])[:k]
    return ("in message content" if content else ""), ", ".join(f"{t!r} {v:.3f}" for t, v in top)


def example_context(r: TokenRow, scale: Scale, mark_max: bool) -> dict[str, Any]:
    """One example of the token view: its title, header numbers, highest tokens and token cells."""
    act = [(v, j) for j, (v, a) in enumerate(zip(r.values, r.active, strict=True)) if a and math.isfinite(v)]
    jmax = max(act)[1] if (act and mark_max) else -1
    where, top = highest_tokens(r)
    tpl = r.template or [False] * len(r.tokens)
    cells = [
        token_cell(t, tid, v, a, n, scale, is_max=j == jmax, is_template=tp)
        for j, (t, v, a, n, tid, tp) in enumerate(zip(r.tokens, r.values, r.active, r.notes, r.token_ids, tpl,
                                                      strict=True))
    ]
    meta = " · ".join(f"{k} {fmt_value(v)}" for k, v in r.header.items())
    return {"title": r.title, "meta": meta, "where": where, "top": top, "tokens": cells, "n_hidden": r.n_hidden}


def view_context(view: TokenView) -> dict[str, Any]:
    """What ``token_view.html.j2`` shows of one run: targets on the α scale, candidates on the s_j one."""
    targets = Scale(*value_range(view.targets), ALPHA_RGB, "α")
    matches = Scale(*value_range(view.top + view.bottom), MATCH_RGB, "s_j")
    return {
        "run": view.run,
        "notes": view.notes,
        "targets": [example_context(r, targets, mark_max=False) for r in view.targets],
        "top": [example_context(r, matches, mark_max=True) for r in view.top],
        "bottom": [example_context(r, matches, mark_max=True) for r in view.bottom],
        "target_scale": targets.legend(),
        "match_scale": matches.legend(),
    }


# --------------------------------------------------------------------------------------------
# The page's tables
# --------------------------------------------------------------------------------------------

RUN_COLUMNS = [("label", "label", False), ("method", "method", False), ("folder", "dir", False),
               ("model", "model", False), ("budget", "budget", False), ("pool rows", "pool_rows", True),
               ("scored rows", "scored_rows", True), ("coreset rows", "coreset_rows", True)]
SCORE_COLUMNS = [("finite", "finite"), ("−inf", "minus_inf"), ("mean selected", "selected_mean"),
                 ("min selected", "selected_min"), ("mean not selected", "rest_mean")]
LENGTH_COLUMNS = ["n", "mean", "median", "p10", "p90"]


def runs_table(summary: dict[str, Any]) -> Table:
    rows = [[r[key] for _, key, _ in RUN_COLUMNS] + ["yes" if r["has_fingerprints"] else "no"]
            for r in summary["runs"]]
    return Table([h for h, _, _ in RUN_COLUMNS] + ["fingerprints"], rows, [n for _, _, n in RUN_COLUMNS] + [False])


def lengths_table(summary: dict[str, Any]) -> Table:
    sets = [("pool " + Path(k).name, v) for k, v in summary["pools"].items()]
    sets += [(r["label"], r) for r in summary["runs"]]
    rows = [[name, *(s["lengths"][c] for c in LENGTH_COLUMNS)] for name, s in sets]
    return Table(["set", "rows", "mean", "median", "p10", "p90"], rows, [False] + [True] * 5)


def mix_table(summary: dict[str, Any]) -> Table:
    """Each set's share of every ``dataset`` value (paper Fig. 4/5)."""
    cats = list(next(iter(summary["pools"].values()))["dataset"]) or sorted(
        {k for r in summary["runs"] for k in r["dataset"]}
    )
    sets = [("pool " + Path(k).name, v["dataset"]) for k, v in summary["pools"].items()]
    sets += [(r["label"], r["dataset"]) for r in summary["runs"]]
    rows = []
    for name, counts in sets:
        n = max(sum(counts.values()), 1)
        rows.append([name, *[f"{100 * counts.get(c, 0) / n:.1f}% ({counts.get(c, 0)})" for c in cats]])
    return Table(["set", *cats], rows, [False] + [True] * len(cats))


def task_tables(summary: dict[str, Any], top: int) -> list[tuple[str, int, Table]]:
    """Per run: its ``top`` tasks, their share of the coreset and of the pool."""
    pool_task = next(iter(summary["pools"].values()))["task"]
    pool_n = max(sum(pool_task.values()), 1)
    out = []
    for r in summary["runs"]:
        n = max(sum(r["task"].values()), 1)
        rows = [[t, c, f"{100 * c / n:.1f}%", f"{100 * pool_task.get(t, 0) / pool_n:.1f}%"]
                for t, c in list(r["task"].items())[:top]]
        out.append((r["label"], r["coreset_rows"],
                    Table(["task", "rows", "% of coreset", "% of pool"], rows, [False, True, True, True])))
    return out


def scores_table(summary: dict[str, Any]) -> Table:
    rows = [[r["label"], *(r["scores"][key] for _, key in SCORE_COLUMNS)] for r in summary["runs"]]
    return Table(["run", *(h for h, _ in SCORE_COLUMNS)], rows, [False] + [True] * 5)


def overlap_table(overlap: dict[str, Any]) -> Table:
    labels = overlap["labels"]
    rows = [[a, *[f"{overlap['jaccard'][i][j]:.3f} ({overlap['intersection'][i][j]})" for j in range(len(labels))]]
            for i, a in enumerate(labels)]
    return Table(["", *labels], rows, [False] + [True] * len(labels))


def sizes_line(summary: dict[str, Any]) -> str:
    pools = "; ".join(
        f"pool {Path(p['path']).name if p['path'] else '?'}: {p['rows']:,} rows" for p in summary["pools"].values()
    )
    cores = ", ".join(f"{r['label']} {r['coreset_rows']:,}" for r in summary["runs"])
    return f"{pools} · coreset rows: {cores}"


def preview_text(rec: Record | None, limit: int = 360) -> str:
    if rec is None:
        return "(not available)"
    text = "\n".join(f"[{m.role}] {m.content}" for m in rec.messages)
    return text if len(text) <= limit else text[:limit] + " …"


def previews(runs: Sequence[RunData], pools: dict[str, PoolData], n: int) -> list[tuple[str, list[tuple]]]:
    """The first ``n`` coreset rows of each run: id, dataset, task, score, length, text."""
    out = []
    for r in runs:
        pool = pools[r.pool_key]
        rows = []
        for row in r.coreset_rows()[:n]:
            i = int(r.index[row])
            rows.append((r.ids[row], pool.dataset.get(i, "–"), pool.task.get(i, "–"), float(r.score[row]),
                         pool.lengths.get(i), preview_text(pool.records.get(i))))
        out.append((r.label, rows))
    return out


def figure_context(path: Path | None, out_dir: Path, embed: bool, alt: str) -> dict[str, str] | None:
    """A figure's link, image source (a data URI when embedded) and alt text; None without a figure."""
    if path is None:
        return None
    if embed:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    else:
        src = path.relative_to(out_dir).as_posix()
    return {"name": path.name, "src": src, "alt": alt}


FIGURE_ALT = {"lengths": "length distribution", "source_mix": "source mix", "task_mix": "task mix",
              "scores": "score histograms", "overlap": "overlap"}


def render_html(
    summary: dict[str, Any],
    runs: Sequence[RunData],
    pools: dict[str, PoolData],
    figures: dict[str, Path | None],
    views: Sequence[TokenView],
    notes: Sequence[str],
    out_dir: Path,
    cfg: ReportConfig,
) -> str:
    """The page (``report.html.j2``): sizes, run table, each figure with its sizes and table, token
    views, previews."""
    return ENV.get_template("report.html.j2").render(
        title=cfg.title,
        notes=notes,
        sizes=sizes_line(summary),
        runs_table=runs_table(summary),
        length_notes=[(Path(k).name, p["length_note"]) for k, p in summary["pools"].items()],
        lengths_table=lengths_table(summary),
        mix_table=mix_table(summary) if figures.get("source_mix") else None,
        top_tasks=cfg.top_tasks,
        task_tables=task_tables(summary, cfg.top_tasks) if figures.get("task_mix") else [],
        scores_table=scores_table(summary),
        matched_by=summary["overlap"]["matched_by"],
        overlap_table=overlap_table(summary["overlap"]),
        figures={k: figure_context(figures.get(k), out_dir, cfg.embed_figures, alt) for k, alt in FIGURE_ALT.items()},
        token_view=cfg.token_view,
        views=[view_context(v) for v in views],
        n_preview=cfg.n_preview,
        previews=previews(runs, pools, cfg.n_preview),
    )
