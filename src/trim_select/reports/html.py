"""HTML: one self-contained page from the summary, figures and token view."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import Record
from .config import ReportConfig
from .load import PoolData, RunData
from .tokens import TokenRow, TokenView

# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
 max-width:1280px;color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.88em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption,.sizes{font-size:0.88em;color:#444}
.sizes{background:#f7f7fb;padding:4px 8px;border-left:3px solid #99c}
.note{background:#fff8e1;border-left:3px solid #e0b000;padding:4px 8px;font-size:0.9em;margin:6px 0}
.seq{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-word;
 border:1px solid #ddd;padding:8px;max-height:340px;overflow:auto;background:#fff;line-height:1.75}
.tok{border-radius:2px;padding:1px 0}.tok.off{color:#aaa}.tok.max{outline:2px solid #c00}
.tok.unseen{text-decoration:underline dotted}.tok.tpl{font-style:italic}
.ex h4{margin:14px 0 4px;font-size:0.95em}.ex .meta{font-size:0.82em;color:#555}
.legend{display:inline-block;width:160px;height:12px;vertical-align:middle;border:1px solid #ccc}
.preview{max-width:720px;white-space:pre-wrap;font-size:0.9em}
"""

ALPHA_RGB = (235, 120, 0)
MATCH_RGB = (30, 100, 220)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 3) -> str:
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


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[bool] | None = None) -> str:
    num = num or [False] * len(head)
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append(
            "<tr>"
            + "".join(
                f"<td class='num'>{_e(_fmt(v))}</td>" if n else f"<td>{_e(_fmt(v))}</td>"
                for v, n in zip(row, num, strict=True)
            )
            + "</tr>"
        )
    out.append("</table>")
    return "".join(out)


def _sizes(summary: dict[str, Any]) -> str:
    pools = "; ".join(
        f"pool {Path(p['path']).name if p['path'] else '?'}: {p['rows']:,} rows" for p in summary["pools"].values()
    )
    cores = ", ".join(f"{r['label']} {r['coreset_rows']:,}" for r in summary["runs"])
    return f"<p class='sizes'>{_e(pools)} · coreset rows: {_e(cores)}</p>"


def _img(path: Path, out_dir: Path, embed: bool, alt: str) -> str:
    if embed:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    else:
        src = path.relative_to(out_dir).as_posix()
    return f"<figure><a href='{_e(path.name)}'><img src='{_e(src)}' alt='{_e(alt)}'></a></figure>"


def _span(
    tok: str,
    value: float,
    active: bool,
    note: str,
    scale: tuple[float, float, tuple[int, int, int], str],
    *,
    is_max: bool,
    is_template: bool,
    tid: int,
) -> str:
    """One token as a coloured span; its value (or why it does not count) in the tooltip."""
    lo, hi, rgb, symbol = scale
    shown = tok.replace("\n", "↵\n") if tok else "∅"
    tip = f"{symbol}={value:.4f}" if active else note
    if active and note:
        tip += f" · {note}"
    if is_template:
        tip += " · chat-template scaffolding (not message content)"
    tip += f" · token {tok!r} (id {tid})"
    cls = ["tok"]
    style = ""
    if active:
        v = 0.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
        style = f" style='background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.06 + 0.84 * v:.3f})'"
        if note:
            cls.append("unseen")
        if is_max:
            cls.append("max")
    else:
        cls.append("off")
    if is_template:
        cls.append("tpl")
    return f"<span class='{' '.join(cls)}'{style} title='{_e(tip)}'>{_e(shown)}</span>"


def _scale(rows: Sequence[TokenRow]) -> tuple[float, float]:
    vals = [v for r in rows for v, a in zip(r.values, r.active, strict=True) if a and math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    return float(min(vals)), float(max(vals))


def _legend(lo: float, hi: float, rgb: tuple[int, int, int], symbol: str) -> str:
    c0 = f"rgba({rgb[0]},{rgb[1]},{rgb[2]},0.06)"
    c1 = f"rgba({rgb[0]},{rgb[1]},{rgb[2]},0.9)"
    return (
        f"<p class='meta'>colour scale: {_e(symbol)} = {lo:.3f} "
        f"<span class='legend' style='background:linear-gradient(to right,{c0},{c1})'></span> "
        f"{hi:.3f}; grey = not counted (special, out of scope); italic = chat-template scaffolding "
        "(role headers, default system prompt: the same in every example); hover a token for its value.</p>"
    )


def _highest(r: TokenRow, k: int = 8) -> tuple[str, str]:
    """The ``k`` distinct token strings with the highest value (message content only when known)."""
    content = bool(r.template)
    best: dict[str, float] = {}
    for j, (v, a) in enumerate(zip(r.values, r.active, strict=True)):
        if a and math.isfinite(v) and not (content and r.template[j]):
            best[r.tokens[j]] = max(v, best.get(r.tokens[j], -math.inf))
    top = sorted(best.items(), key=lambda kv: -kv[1])[:k]
    return ("in message content" if content else ""), ", ".join(f"{t!r} {v:.3f}" for t, v in top)


def _token_rows_html(
    rows: Sequence[TokenRow], lo: float, hi: float, rgb: tuple[int, int, int], symbol: str, mark_max: bool
) -> str:
    out = []
    scale = (lo, hi, rgb, symbol)
    for r in rows:
        act = [(v, j) for j, (v, a) in enumerate(zip(r.values, r.active, strict=True)) if a and math.isfinite(v)]
        jmax = max(act)[1] if (act and mark_max) else -1
        where, top = _highest(r)
        meta = " · ".join(f"{k} {_fmt(v)}" for k, v in r.header.items())
        tpl = r.template or [False] * len(r.tokens)
        spans = "".join(
            _span(t, v, a, n, scale, is_max=j == jmax, is_template=tp, tid=tid)
            for j, (t, v, a, n, tid, tp) in enumerate(
                zip(r.tokens, r.values, r.active, r.notes, r.token_ids, tpl, strict=True)
            )
        )
        more = f"<span class='tok off'> … {r.n_hidden} more tokens not shown</span>" if r.n_hidden else ""
        out.append(
            f"<div class='ex'><h4>{_e(r.title)}</h4><div class='meta'>{_e(meta)}</div>"
            f"<div class='meta'>highest {_e(symbol)} {_e(where)}: {_e(top)}</div>"
            f"<div class='seq'>{spans}{more}</div></div>"
        )
    return "".join(out)


def _token_view_html(view: TokenView) -> str:
    parts = [f"<h3>{_e(view.run)}</h3>"]
    parts += [f"<div class='note'>{_e(n)}</div>" for n in view.notes]
    if view.targets:
        lo, hi = _scale(view.targets)
        parts.append(
            "<h4>Target set: saliency α per token (Eq. 7)</h4>"
            "<p class='meta'>α weights each target token's hidden state in its class fingerprint "
            "(Eq. 9): darker = more salient.</p>" + _legend(lo, hi, ALPHA_RGB, "α")
        )
        parts.append(_token_rows_html(view.targets, lo, hi, ALPHA_RGB, "α", mark_max=False))
    cands = view.top + view.bottom
    if cands:
        lo, hi = _scale(cands)
        parts.append(
            "<h4>Candidates: per-token match s<sub>j</sub> (Eq. 10/12)</h4>"
            "<p class='meta'>s<sub>j</sub> = cosine of the token's hidden state to its class "
            "fingerprint; dotted underline = unseen class matched through the nearest embedding "
            "(Eq. 11); red outline = the max term of Eq. 15. Same colour scale for top and bottom."
            "</p>" + _legend(lo, hi, MATCH_RGB, "s_j")
        )
        if view.top:
            parts.append("<h4>Top candidates (selected first)</h4>")
            parts.append(_token_rows_html(view.top, lo, hi, MATCH_RGB, "s_j", mark_max=True))
        if view.bottom:
            parts.append("<h4>Bottom candidates (lowest finite score)</h4>")
            parts.append(_token_rows_html(view.bottom, lo, hi, MATCH_RGB, "s_j", mark_max=True))
    return "".join(parts)


def _preview_text(rec: Record | None, limit: int = 360) -> str:
    if rec is None:
        return "(not available)"
    text = "\n".join(f"[{m.role}] {m.content}" for m in rec.messages)
    return text if len(text) <= limit else text[:limit] + " …"


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
    """The page: sizes, run table, each figure with its sizes and table, token views, previews."""
    sizes = _sizes(summary)
    emb = cfg.embed_figures
    p = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(cfg.title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{_e(cfg.title)}</h1>"
    ]
    p += [f"<div class='note'>{_e(n)}</div>" for n in notes]
    p.append("<h2>Runs</h2>" + sizes)
    p.append(
        _table(
            [
                "label",
                "method",
                "folder",
                "model",
                "budget",
                "pool rows",
                "scored rows",
                "coreset rows",
                "fingerprints",
            ],
            [
                [
                    r["label"],
                    r["method"],
                    r["dir"],
                    r["model"],
                    r["budget"],
                    r["pool_rows"],
                    r["scored_rows"],
                    r["coreset_rows"],
                    "yes" if r["has_fingerprints"] else "no",
                ]
                for r in summary["runs"]
            ],
            [False, False, False, False, False, True, True, True, False],
        )
    )

    # lengths
    p.append("<h2>Length distribution (paper Fig. 3)</h2>" + sizes)
    for key, pl in summary["pools"].items():
        p.append(f"<p class='meta'>Lengths of {_e(Path(key).name)}: {_e(pl['length_note'])}.</p>")
    if figures.get("lengths"):
        p.append(_img(figures["lengths"], out_dir, emb, "length distribution"))
    rows = [
        [
            ("pool " + Path(k).name),
            v["lengths"]["n"],
            v["lengths"]["mean"],
            v["lengths"]["median"],
            v["lengths"]["p10"],
            v["lengths"]["p90"],
        ]
        for k, v in summary["pools"].items()
    ]
    rows += [
        [
            r["label"],
            r["lengths"]["n"],
            r["lengths"]["mean"],
            r["lengths"]["median"],
            r["lengths"]["p10"],
            r["lengths"]["p90"],
        ]
        for r in summary["runs"]
    ]
    p.append(_table(["set", "rows", "mean", "median", "p10", "p90"], rows, [False] + [True] * 5))

    # source mix
    p.append("<h2>Source mix (paper Fig. 4/5)</h2>" + sizes)
    if figures.get("source_mix"):
        p.append(_img(figures["source_mix"], out_dir, emb, "source mix"))
        cats = list(next(iter(summary["pools"].values()))["dataset"]) or sorted(
            {k for r in summary["runs"] for k in r["dataset"]}
        )
        head = ["set", *cats]
        rows = []
        for k, v in summary["pools"].items():
            n = max(sum(v["dataset"].values()), 1)
            rows.append(
                [
                    "pool " + Path(k).name,
                    *[f"{100 * v['dataset'].get(c, 0) / n:.1f}% ({v['dataset'].get(c, 0)})" for c in cats],
                ]
            )
        for r in summary["runs"]:
            n = max(sum(r["dataset"].values()), 1)
            rows.append(
                [
                    r["label"],
                    *[f"{100 * r['dataset'].get(c, 0) / n:.1f}% ({r['dataset'].get(c, 0)})" for c in cats],
                ]
            )
        p.append(_table(head, rows, [False] + [True] * len(cats)))
    else:
        p.append(
            "<div class='note'>The pool rows have no 'dataset' field (or the pool file is not readable): "
            "no source mix.</div>"
        )
    if figures.get("task_mix"):
        p.append(f"<h3>Top {cfg.top_tasks} tasks ('task' field)</h3>" + sizes)
        p.append(_img(figures["task_mix"], out_dir, emb, "task mix"))
        pool_task = next(iter(summary["pools"].values()))["task"]
        pool_n = max(sum(pool_task.values()), 1)
        for r in summary["runs"]:
            n = max(sum(r["task"].values()), 1)
            rows = [
                [t, c, f"{100 * c / n:.1f}%", f"{100 * pool_task.get(t, 0) / pool_n:.1f}%"]
                for t, c in list(r["task"].items())[: cfg.top_tasks]
            ]
            p.append(f"<p><b>{_e(r['label'])}</b> ({r['coreset_rows']:,} coreset rows)</p>")
            p.append(_table(["task", "rows", "% of coreset", "% of pool"], rows, [False, True, True, True]))

    # scores
    p.append("<h2>Score histograms</h2>" + sizes)
    if figures.get("scores"):
        p.append(_img(figures["scores"], out_dir, emb, "score histograms"))
    p.append(
        _table(
            ["run", "finite", "−inf", "mean selected", "min selected", "mean not selected"],
            [
                [
                    r["label"],
                    r["scores"]["finite"],
                    r["scores"]["minus_inf"],
                    r["scores"]["selected_mean"],
                    r["scores"]["selected_min"],
                    r["scores"]["rest_mean"],
                ]
                for r in summary["runs"]
            ],
            [False] + [True] * 5,
        )
    )

    # overlap
    ov = summary["overlap"]
    p.append("<h2>Overlap between methods</h2>" + sizes)
    p.append(
        f"<p class='meta'>Jaccard |A∩B|/|A∪B| of the coresets, matched by {_e(ov['matched_by'])}; "
        "shared rows in brackets.</p>"
    )
    if figures.get("overlap"):
        p.append(_img(figures["overlap"], out_dir, emb, "overlap"))
    p.append(
        _table(
            ["", *ov["labels"]],
            [
                [
                    a,
                    *[f"{ov['jaccard'][i][j]:.3f} ({ov['intersection'][i][j]})" for j in range(len(ov["labels"]))],
                ]
                for i, a in enumerate(ov["labels"])
            ],
            [False] + [True] * len(ov["labels"]),
        )
    )

    # token view
    p.append("<h2>Token view: why an example was chosen</h2>" + sizes)
    if not cfg.token_view:
        p.append("<div class='note'>Token view disabled (--no-token-view).</div>")
    elif not views:
        p.append("<div class='note'>No run to show a token view for.</div>")
    for v in views:
        p.append(_token_view_html(v))

    # previews
    p.append(f"<h2>Coreset preview (first {cfg.n_preview} rows of each coreset)</h2>" + sizes)
    for r in runs:
        pool = pools[r.pool_key]
        rows = []
        for row in r.coreset_rows()[: cfg.n_preview]:
            i = int(r.index[row])
            rows.append(
                (
                    r.ids[row],
                    pool.dataset.get(i, "–"),
                    pool.task.get(i, "–"),
                    float(r.score[row]),
                    pool.lengths.get(i),
                    _preview_text(pool.records.get(i)),
                )
            )
        body = "".join(
            f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{_e(c)}</td><td class='num'>{_e(_fmt(s))}</td>"
            f"<td class='num'>{_e(_fmt(n))}</td><td class='preview'>{_e(t)}</td></tr>"
            for a, b, c, s, n, t in rows
        )
        p.append(
            f"<h3>{_e(r.label)}</h3><table><tr><th>id</th><th>dataset</th><th>task</th><th>score</th>"
            f"<th>length</th><th>text</th></tr>{body}</table>"
        )
    p.append("<p class='meta'>Numbers: summary.json beside this page.</p></body></html>")
    return "".join(p)
