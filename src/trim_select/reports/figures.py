"""Figures (matplotlib, imported lazily): lengths (paper Fig. 3), source and task mix (Fig. 4/5),
score histograms, overlap."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_path
from .load import PoolData, RunData

# --------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg canvas; no pyplot global state)
# --------------------------------------------------------------------------------------------

POOL_COLOR = "#9a9a9a"


def _colors(n: int) -> list[str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if n <= 10 else colormaps["tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _new_figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _nice(x: float) -> float:
    """``x`` rounded to two significant digits (bucket edges people can read)."""
    if x < 10:
        return float(round(x))
    mag = 10 ** (math.floor(math.log10(x)) - 1)
    return float(round(x / mag) * mag)


def _plain_log_axis(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def length_buckets(pool_lengths: np.ndarray, n: int = 10) -> np.ndarray:
    """Bucket edges at the pool's deciles, rounded to readable numbers (last edge = +inf)."""
    if len(pool_lengths) == 0:
        return np.array([0.0, np.inf])
    qs = np.quantile(pool_lengths, np.linspace(0, 1, n + 1)[1:-1])
    edges = sorted({0.0, *(_nice(float(q)) for q in qs)})
    return np.array([*edges, np.inf], dtype=np.float64)


def figure_lengths(runs: Sequence[RunData], pools: dict[str, PoolData], path: Path) -> Path:
    """Paper Fig. 3: percent of each coreset per length bucket (pool deciles), and the CDFs."""
    fig = _new_figure(13, 4.8)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.5, 1])
    all_pool = np.array([v for p in pools.values() for v in p.lengths.values()], dtype=np.float64)
    edges = length_buckets(all_pool)
    series: list[tuple[str, np.ndarray, Any]] = []
    for key, p in pools.items():
        name = "pool" if len(pools) == 1 else f"pool {Path(key).name}"
        series.append((name, np.array(list(p.lengths.values()), dtype=np.float64), POOL_COLOR))
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        p = pools[r.pool_key]
        series.append(
            (
                r.label,
                np.array([p.lengths[i] for i in r.coreset().tolist() if i in p.lengths], dtype=np.float64),
                c,
            )
        )
    nb = len(edges) - 1
    width = 0.85 / len(series)
    x = np.arange(nb)
    for k, (name, vals, c) in enumerate(series):
        counts = np.histogram(vals, bins=edges)[0] if len(vals) else np.zeros(nb)
        pct = 100.0 * counts / max(len(vals), 1)
        mean = f"{vals.mean():.0f}" if len(vals) else "n/a"
        ax1.bar(
            x - 0.425 + width * (k + 0.5),
            pct,
            width,
            color=c,
            label=f"{name} (n={len(vals)}, mean {mean})",
            edgecolor="white",
            linewidth=0.3,
        )
    labels = [
        f"{edges[i]:.0f}–{edges[i + 1]:.0f}" if np.isfinite(edges[i + 1]) else f"≥{edges[i]:.0f}" for i in range(nb)
    ]
    ax1.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    ax1.set_xlabel("length bucket (tokens; bucket edges = pool deciles)")
    ax1.set_ylabel("% of examples")
    ax1.set_title("Length distribution of each coreset vs the pool")
    ax1.legend(fontsize=8, frameon=False)
    ax1.grid(axis="y", alpha=0.3)
    for name, vals, c in series:
        if len(vals) == 0:
            continue
        v = np.sort(vals)
        ax2.step(
            v,
            np.arange(1, len(v) + 1) / len(v),
            where="post",
            color=c,
            label=name,
            linewidth=2.2 if name.startswith("pool") else 1.5,
        )
        ax2.axvline(v.mean(), color=c, linestyle=":", linewidth=1)
    lo, hi = (float(all_pool.min()), float(all_pool.max())) if len(all_pool) else (1.0, 1.0)
    log_x = lo > 0 and hi / lo > 20
    if log_x:
        ax2.set_xscale("log")
        _plain_log_axis(ax2.xaxis)
    ax2.set_xlabel(f"length (tokens{', log scale' if log_x else ''}); dotted = mean")
    ax2.set_ylabel("fraction of examples ≤ length")
    ax2.set_title("Cumulative distribution")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, frameon=False, loc="lower right")
    return _save(fig, path)


def figure_source_mix(summary: dict[str, Any], path: Path, field_name: str = "dataset") -> Path | None:
    """Paper Fig. 4/5: stacked horizontal bars of the ``dataset`` share in the pool and each coreset."""
    rows: list[tuple[str, dict[str, int]]] = []
    for key, p in summary["pools"].items():
        if p[field_name]:
            rows.append(("pool" if len(summary["pools"]) == 1 else f"pool {Path(key).name}", p[field_name]))
    for r in summary["runs"]:
        if r[field_name]:
            rows.append((r["label"], r[field_name]))
    if not rows:
        return None
    total: Counter[str] = Counter()
    for _, mix in rows:
        n = sum(mix.values()) or 1
        for k, v in mix.items():
            total[k] += v / n
    cats = [k for k, _ in total.most_common()]
    if len(cats) > 12:
        keep = set(cats[:11])
        rows = [
            (
                name,
                {
                    **{k: v for k, v in mix.items() if k in keep},
                    "(other)": sum(v for k, v in mix.items() if k not in keep),
                },
            )
            for name, mix in rows
        ]
        cats = cats[:11] + ["(other)"]
    fig = _new_figure(11, 1.2 + 0.55 * len(rows))
    ax = fig.subplots()
    colors = _colors(len(cats))
    y = np.arange(len(rows))[::-1]
    left = np.zeros(len(rows))
    for cat, c in zip(cats, colors, strict=True):
        pct = np.array([100.0 * mix.get(cat, 0) / max(sum(mix.values()), 1) for _, mix in rows])
        ax.barh(y, pct, left=left, color=c, label=cat, edgecolor="white", linewidth=0.5)
        for yy, ll, pp in zip(y, left, pct, strict=True):
            if pp >= 4:
                ax.text(ll + pp / 2, yy, f"{pp:.0f}%", ha="center", va="center", fontsize=8, color="black")
        left += pct
    ax.set_yticks(y, [f"{name} (n={sum(mix.values())})" for name, mix in rows])
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of examples by '{field_name}'")
    ax.set_title(f"Source mix ('{field_name}' field) of the pool and each coreset")
    ax.legend(
        ncols=min(len(cats), 6),
        fontsize=8,
        frameon=False,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.35 if len(rows) < 4 else -0.18),
    )
    return _save(fig, path)


def figure_task_mix(summary: dict[str, Any], path: Path, top: int = 10) -> Path | None:
    """Heatmap: % of each coreset from the union of every coreset's top tasks (``task`` field)."""
    runs = [r for r in summary["runs"] if r["task"]]
    if not runs:
        return None
    tasks: list[str] = []
    for r in runs:
        for t in list(r["task"])[:top]:
            if t not in tasks:
                tasks.append(t)
    tasks = tasks[:25]
    pool = next((p for p in summary["pools"].values() if p["task"]), None)
    cols = ([("pool", pool["task"])] if pool and len(summary["pools"]) == 1 else []) + [
        (r["label"], r["task"]) for r in runs
    ]
    mat = np.array([[100.0 * mix.get(t, 0) / max(sum(mix.values()), 1) for _, mix in cols] for t in tasks])
    order = np.argsort(-mat[:, -len(runs) :].max(axis=1), kind="stable")  # largest coreset share first
    mat, tasks = mat[order], [tasks[i] for i in order]
    from matplotlib.colors import PowerNorm

    fig = _new_figure(2.5 + 1.3 * len(cols), 1.5 + 0.32 * len(tasks))
    ax = fig.subplots()
    vmax = max(float(mat.max()), 1.0)
    im = ax.imshow(mat, cmap="Blues", aspect="auto", norm=PowerNorm(0.5, vmin=0, vmax=vmax))
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            v = mat[i, j]
            ax.text(
                j,
                i,
                f"{v:.1f}" if v else "·",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > 0.4 * vmax else "black",
            )
    ax.set_xticks(range(len(cols)), [f"{n}\n(n={sum(m.values())})" for n, m in cols], fontsize=8)
    ax.set_yticks(range(len(tasks)), [t if len(t) <= 45 else t[:42] + "…" for t in tasks], fontsize=7)
    ax.set_title(f"% of examples per task (union of each coreset's top {top})", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.6, label="% (square-root colour scale)")
    return _save(fig, path)


def figure_scores(runs: Sequence[RunData], path: Path) -> Path:
    """Histogram of finite scores per run, selected against not selected (log count axis)."""
    n = len(runs)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(4.6 * ncols, 3.3 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, r, c in zip(axes, runs, _colors(n), strict=False):
        s = r.score
        fin = np.isfinite(s)
        if not fin.any():
            ax.text(0.5, 0.5, "no finite scores", ha="center", transform=ax.transAxes)
            ax.set_title(r.label)
            continue
        rest, sel = s[fin & ~r.selected], s[fin & r.selected]
        lo, hi = float(s[fin].min()), float(s[fin].max())
        zoom = ""
        if len(sel) and len(rest) and (sel.max() - sel.min()) < 0.03 * (hi - lo):
            # the coreset would fill one or two bins of the full range: show the top of the range
            width = float(sel.max() - sel.min()) or 0.05 * (hi - lo)
            lo = max(lo, float(sel.min()) - 2.0 * width)
            hidden = int((rest < lo).sum())
            rest = rest[rest >= lo]
            zoom = f"zoom on scores ≥ {lo:.4g}; {hidden} lower not shown"
        bins = np.histogram_bin_edges(np.concatenate([rest, sel]), bins=40, range=(lo, hi) if hi > lo else None)
        counts, _, _ = ax.hist(
            [rest, sel],
            bins=bins,
            stacked=True,
            color=[POOL_COLOR, c],
            label=[f"not selected ({int((fin & ~r.selected).sum())})", f"selected ({len(sel)})"],
        )
        if float(np.max(counts)) >= 50:
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
        ninf = int(np.isneginf(s).sum())
        ax.set_title(f"{r.label}" + (f"  ({ninf} at −inf, not shown)" if ninf else ""), fontsize=10)
        ax.set_xlabel("score" + (f"  ({zoom})" if zoom else ""), fontsize=9 if zoom else None)
        ax.set_ylabel("examples" + (" (log)" if ax.get_yscale() == "log" else ""))
        ax.legend(fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    return _save(fig, path)


def figure_overlap(summary: dict[str, Any], path: Path) -> Path:
    """Annotated Jaccard matrix of the coresets (intersection counts in brackets)."""
    labels = summary["overlap"]["labels"]
    jac = np.array(summary["overlap"]["jaccard"])
    inter = summary["overlap"]["intersection"]
    n = len(labels)
    fig = _new_figure(2.8 + 1.2 * n, 1.6 + 1.0 * n)
    ax = fig.subplots()
    im = ax.imshow(jac, cmap="viridis", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{jac[i, j]:.2f}\n({inter[i][j]})",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if jac[i, j] > 0.6 else "white",
            )
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_title("Coreset overlap: Jaccard (shared examples)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)
