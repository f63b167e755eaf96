"""Reports: figures and one HTML page that compare the coresets of several selection runs.

Each input folder is the output of ``trim-select select`` (or ``score --budget``, or ``baseline``):
``scores.parquet`` (``index``, ``id``, ``score``, ``selected``, ``rank`` and, for TRIM,
``n_tokens``, ``mean``, ``max``, ``coverage``, ...), ``coreset.jsonl``, ``run.json`` and, for TRIM,
``fingerprints.safetensors``. The report shows (paper Section 4.4 and H):

- the token-length distribution of each coreset against the pool (Fig. 3);
- the source mix of each coreset, by the pool rows' ``dataset`` field, and the top tasks (Fig. 4/5);
- score histograms, selected against not selected;
- the overlap between coresets (Jaccard matrix);
- a token view: saliency ``alpha`` (Eq. 7) over the target set and per-token matches ``s_j``
  (Eq. 10/12) over the top and bottom candidates, so a user can see why an example was chosen.

Usage::

    from trim_select.reports import ReportConfig, build_report
    summary = build_report(["runs/trim", "runs/bm25"], "report/", ReportConfig(targets="val.jsonl"))

Loading runs, computing the statistics, drawing figures, the token view and writing HTML are
separate steps; ``summary.json`` holds every number the figures show.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .data import Record, read_records
from .io import atomic_path, write_json

log = logging.getLogger(__name__)

WHITESPACE = "whitespace"
N_TOKENS = "n_tokens"
TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class ReportConfig:
    """What ``build_report`` draws and where the token view gets its model and targets."""

    model: str | None = None  # token view / tokenizer; None: the model recorded in run.json
    targets: str | Path | None = None  # target file for the saliency view; None: run.json "targets"
    pool: str | Path | None = None  # override the pool path recorded in run.json
    token_view: bool = True
    n_examples: int = 3  # top and bottom candidates in the token view
    n_targets: int = 10  # target examples in the token view
    n_preview: int = 5  # coreset rows per method in the preview table
    max_tokens: int = 768  # tokens shown per example in the token view
    top_tasks: int = 10
    device: str = "auto"
    dtype: str | None = None  # None: the dtype recorded in run.json (else auto)
    embed_figures: bool = True  # PNGs inlined as data URIs (the page is self-contained)
    title: str = "trim-select report"

    def __post_init__(self) -> None:
        if self.n_examples < 0 or self.n_targets < 0 or self.n_preview < 0 or self.max_tokens < 1:
            raise ValueError("n_examples, n_targets and n_preview must be >= 0 and max_tokens >= 1")


# --------------------------------------------------------------------------------------------
# Loading runs and the pool
# --------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """One selection output folder, read into arrays aligned with ``scores.parquet`` rows."""

    dir: Path
    label: str
    method: str
    info: dict[str, Any]
    columns: dict[str, np.ndarray]  # numeric columns of scores.parquet (index, score, selected, ...)
    ids: list[str]
    pool_path: Path | None
    fingerprints_path: Path | None
    pool_key: str = ""  # key of its pool in the report's pool table

    @property
    def index(self) -> np.ndarray:
        return self.columns["index"]

    @property
    def score(self) -> np.ndarray:
        return self.columns["score"]

    @property
    def selected(self) -> np.ndarray:
        return self.columns["selected"]

    def order(self) -> np.ndarray:
        """Row positions of the scores table, best first (rank, else score desc, ties to lower index)."""
        s = np.asarray(self.score, dtype=np.float64)
        key = np.where(np.isnan(s), np.inf, -s)
        return np.lexsort((self.index, key))

    def coreset_rows(self) -> np.ndarray:
        """Row positions of the selected examples, best first."""
        o = self.order()
        return o[self.selected[o]]

    def coreset(self) -> np.ndarray:
        """Pool indices of the coreset, best first."""
        return self.index[self.coreset_rows()]


def _pool_path(info: dict[str, Any]) -> Path | None:
    pool = info.get("pool")
    if isinstance(pool, dict):
        pool = pool.get("path")
    return Path(pool) if isinstance(pool, str) and pool else None


def load_run(path: str | Path, pool: str | Path | None = None) -> RunData:
    """Read one output folder. Raises ``FileNotFoundError``/``ValueError`` naming what is missing."""
    d = Path(path)
    scores_path = d / "scores.parquet"
    if not scores_path.exists():
        raise FileNotFoundError(f"{d}: no scores.parquet (not an output folder of select/baseline)")
    info = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    table = pq.read_table(scores_path)
    names = table.column_names
    for col in ("index", "score", "selected"):
        if col not in names:
            hint = " (the run had no --budget)" if col == "selected" else ""
            raise ValueError(f"{scores_path} has no {col!r} column{hint}")
    cols: dict[str, np.ndarray] = {}
    for name in names:
        if name == "id":
            continue
        arr = table.column(name).to_numpy(zero_copy_only=False)
        if arr.dtype.kind in "biuf":
            cols[name] = arr
    cols["index"] = cols["index"].astype(np.int64)
    cols["score"] = cols["score"].astype(np.float64)
    cols["selected"] = cols["selected"].astype(bool)
    ids = [str(x) for x in table.column("id").to_pylist()] if "id" in names else [str(i) for i in cols["index"]]
    fp = d / "fingerprints.safetensors"
    method = str(
        info.get("method") or ("trim" if fp.exists() or info.get("command") in ("select", "score") else d.name)
    )
    return RunData(
        dir=d,
        label=method,
        method=method,
        info=info,
        columns=cols,
        ids=ids,
        pool_path=Path(pool) if pool is not None else _pool_path(info),
        fingerprints_path=fp if fp.exists() else None,
    )


def _unique_labels(runs: Sequence[RunData]) -> None:
    counts = Counter(r.method for r in runs)
    seen: Counter[str] = Counter()
    for r in runs:
        if counts[r.method] == 1:
            r.label = r.method
            continue
        label = f"{r.method}:{r.dir.name}"
        seen[label] += 1
        r.label = label if seen[label] == 1 else f"{label}#{seen[label]}"


@dataclass
class PoolData:
    """What the report needs of a pool file: per-row source fields and lengths, records of a few."""

    key: str  # resolved path (or a placeholder when the pool file is not readable)
    path: Path | None
    n_rows: int
    dataset: dict[int, str] = field(default_factory=dict)
    task: dict[int, str] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)
    length_source: str = WHITESPACE
    length_note: str = ""
    records: dict[int, Record] = field(default_factory=dict)
    note: str = ""


def _ws_len(rec: Record) -> int:
    return sum(len(m.content.split()) for m in rec.messages)


def _field_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def scan_pool(path: Path, wanted: set[int], *, format: str | None = None, renderer: Any = None) -> PoolData:
    """One pass over the pool: ``dataset``/``task`` per row, lengths (whitespace tokens, or the
    renderer's token count when given), and the full records of the ``wanted`` indices."""
    pd = PoolData(key=str(path.resolve()), path=path, n_rows=0)
    for rec in read_records(path, format, skip_invalid=True):
        pd.n_rows += 1
        ds = _field_str(rec.fields.get("dataset")) if hasattr(rec.fields, "get") else None
        task = _field_str(rec.fields.get("task")) if hasattr(rec.fields, "get") else None
        if ds is not None:
            pd.dataset[rec.index] = ds
        if task is not None:
            pd.task[rec.index] = task
        pd.lengths[rec.index] = len(renderer(rec)) if renderer is not None else _ws_len(rec)
        if rec.index in wanted:
            pd.records[rec.index] = rec
    pd.length_source = TOKENIZER if renderer is not None else WHITESPACE
    return pd


def _load_tokenizer(spec: str | None) -> Any:
    if not spec:
        return None
    try:
        from transformers import AutoTokenizer

        from .models import resolve_model_path

        return AutoTokenizer.from_pretrained(str(resolve_model_path(spec)), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "no tokenizer": fall back, say so
        log.warning("could not load a tokenizer from %s (%s); lengths fall back to whitespace tokens", spec, exc)
        return None


def _render_config(info: dict[str, Any]) -> Any:
    from .config import RenderConfig

    raw = dict(info.get("config", {}).get("render", {}) or {})
    known = RenderConfig.__dataclass_fields__
    try:
        return RenderConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError):
        return RenderConfig()


def _model_spec(run: RunData, cfg: ReportConfig) -> str | None:
    if cfg.model:
        return cfg.model
    model = run.info.get("model")
    if isinstance(model, dict):
        return model.get("path") or model.get("name")
    return model if isinstance(model, str) else None


def load_pools(runs: Sequence[RunData], cfg: ReportConfig) -> dict[str, PoolData]:
    """Read every distinct pool once; lengths from ``n_tokens`` when a run on that pool has them,
    else by rendering with the model's tokenizer, else whitespace tokens (``length_source`` says)."""
    groups: dict[str, list[RunData]] = {}
    for r in runs:
        key = (
            str(r.pool_path.resolve())
            if r.pool_path is not None and r.pool_path.exists()
            else (f"unreadable:{r.pool_path}")
        )
        groups.setdefault(key, []).append(r)
    pools: dict[str, PoolData] = {}
    for key, members in groups.items():
        wanted: set[int] = set()
        for r in members:
            rows = r.coreset_rows()
            wanted.update(r.index[rows[: max(cfg.n_preview, cfg.n_examples)]].tolist())
            o = r.order()
            finite = o[np.isfinite(r.score[o])]
            wanted.update(r.index[finite[len(finite) - cfg.n_examples :]].tolist() if cfg.n_examples else [])
        with_len = next((r for r in members if "n_tokens" in r.columns), None)
        if key.startswith("unreadable:"):
            first = members[0]
            pd = PoolData(
                key=key,
                path=first.pool_path,
                n_rows=len(first.index),
                note=f"pool file {first.pool_path} not found: source mix and text previews "
                "are not available; pool size taken from scores.parquet",
            )
        else:
            renderer = None
            if with_len is None:
                tok = None
                for r in members:
                    tok = _load_tokenizer(_model_spec(r, cfg))
                    if tok is not None:
                        from .data import Renderer

                        try:
                            renderer = Renderer(tok, _render_config(r.info))
                            break
                        except (TypeError, ValueError) as exc:
                            log.warning("tokenizer unusable for rendering (%s)", exc)
            fmt = _render_config(members[0].info).format
            pd = scan_pool(Path(key), wanted, format=fmt, renderer=renderer)
            if renderer is not None:
                pd.length_note = (
                    "model tokens, rendered with the chat template of "
                    f"{getattr(renderer.tokenizer, 'name_or_path', 'the model')}"
                )
            else:
                pd.length_note = "whitespace-separated words of all messages (no model tokenizer available)"
        if with_len is not None:
            pd.lengths = dict(
                zip(with_len.index.tolist(), with_len.columns["n_tokens"].astype(int).tolist(), strict=True)
            )
            pd.length_source = N_TOKENS
            trunc = with_len.info.get("config", {}).get("render", {}).get("max_length")
            pd.length_note = (
                f"model tokens (n_tokens of scores.parquet in {with_len.dir.name}, chat template "
                "included" + (f", truncated at {trunc}" if trunc else "") + ")"
            )
        pools[key] = pd
        for r in members:
            r.pool_key = key
    return pools


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def jaccard_matrix(sets: Sequence[set[Any]]) -> np.ndarray:
    """``|A ∩ B| / |A ∪ B|`` for every pair (1 on the diagonal, also for two empty sets)."""
    n = len(sets)
    out = np.ones((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            union = len(sets[i] | sets[j])
            out[i, j] = out[j, i] = len(sets[i] & sets[j]) / union if union else 1.0
    return out


def _length_stats(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"n": 0, "mean": math.nan, "median": math.nan, "p10": math.nan, "p90": math.nan}
    return {
        "n": int(len(values)),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p10": float(np.percentile(values, 10)),
        "p90": float(np.percentile(values, 90)),
    }


def _mix(values: list[str | None]) -> dict[str, int]:
    return dict(Counter(v if v is not None else "(none)" for v in values).most_common())


def compute_summary(runs: Sequence[RunData], pools: dict[str, PoolData], cfg: ReportConfig) -> dict[str, Any]:
    """Every number the page shows: sizes, length statistics, source mixes, overlaps, score stats."""
    same_pool = len({r.pool_key for r in runs}) == 1
    key_kind = "pool index" if same_pool else "example id"
    sets = [set(r.coreset().tolist()) if same_pool else {r.ids[i] for i in r.coreset_rows()} for r in runs]
    jac = jaccard_matrix(sets)
    inter = [[len(a & b) for b in sets] for a in sets]
    out: dict[str, Any] = {
        "runs": [],
        "pools": {},
        "overlap": {
            "labels": [r.label for r in runs],
            "jaccard": jac.round(6).tolist(),
            "intersection": inter,
            "matched_by": key_kind,
        },
    }
    for key, p in pools.items():
        lens = np.array(list(p.lengths.values()), dtype=np.float64)
        out["pools"][key] = {
            "path": str(p.path) if p.path else None,
            "rows": p.n_rows,
            "length_source": p.length_source,
            "length_note": p.length_note,
            "lengths": _length_stats(lens),
            "dataset": _mix(list(p.dataset.values())) if p.dataset else {},
            "task": _mix(list(p.task.values())) if p.task else {},
            "note": p.note,
        }
    for r in runs:
        p = pools[r.pool_key]
        core = r.coreset().tolist()
        lens = np.array([p.lengths[i] for i in core if i in p.lengths], dtype=np.float64)
        s = r.score
        fin = np.isfinite(s)
        out["runs"].append(
            {
                "label": r.label,
                "method": r.method,
                "dir": str(r.dir),
                "pool": p.key,
                "pool_rows": p.n_rows,
                "scored_rows": int(len(s)),
                "coreset_rows": int(len(core)),
                "budget": r.info.get("budget"),
                "model": (r.info.get("model") or {}).get("name")
                if isinstance(r.info.get("model"), dict)
                else r.info.get("model"),
                "has_fingerprints": r.fingerprints_path is not None,
                "lengths": _length_stats(lens),
                "dataset": _mix([p.dataset.get(i) for i in core]) if p.dataset else {},
                "task": _mix([p.task.get(i) for i in core]) if p.task else {},
                "scores": {
                    "finite": int(fin.sum()),
                    "minus_inf": int(np.isneginf(s).sum()),
                    "nan": int(np.isnan(s).sum()),
                    "selected_min": float(s[r.selected & fin].min()) if (r.selected & fin).any() else None,
                    "selected_mean": float(s[r.selected & fin].mean()) if (r.selected & fin).any() else None,
                    "rest_mean": float(s[~r.selected & fin].mean()) if (~r.selected & fin).any() else None,
                },
            }
        )
    return out


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


# --------------------------------------------------------------------------------------------
# Token view
# --------------------------------------------------------------------------------------------


@dataclass
class TokenRow:
    """One example in the token view: token strings, values and whether each value counts."""

    title: str
    tokens: list[str]
    token_ids: list[int]
    values: list[float]
    active: list[bool]
    notes: list[str]  # per-token tooltip extra ('' when none)
    header: dict[str, Any] = field(default_factory=dict)
    template: list[bool] = field(default_factory=list)  # chat-template scaffolding, not message content
    n_hidden: int = 0  # tokens cut from the display


@dataclass
class TokenView:
    """The target saliency rows and the candidate match rows of one TRIM run."""

    run: str
    targets: list[TokenRow] = field(default_factory=list)
    top: list[TokenRow] = field(default_factory=list)
    bottom: list[TokenRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _tok_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def _cut(row: TokenRow, max_tokens: int) -> TokenRow:
    if len(row.tokens) > max_tokens:
        row.n_hidden = len(row.tokens) - max_tokens
        for name in ("tokens", "token_ids", "values", "active", "notes", "template"):
            setattr(row, name, getattr(row, name)[:max_tokens])
    return row


def _template_mask(content_renderer: Any, rec: Record, seq: Any) -> list[bool]:
    """True where a token is chat-template scaffolding (role headers, a default system prompt),
    False on message content; empty when the two renderings do not line up (e.g. truncation)."""
    content = content_renderer(rec)
    if not np.array_equal(content.input_ids, seq.input_ids):
        return []
    return (~content.scope_mask).tolist()


def _recorded_targets(info: dict[str, Any]) -> str | None:
    recorded = info.get("targets")
    path = recorded.get("path") if isinstance(recorded, dict) else recorded
    return path if isinstance(path, str) and path else None


def build_token_view(
    run: RunData, pool: PoolData, cfg: ReportConfig, model_cache: dict[str, Any], hint: str | None = None
) -> TokenView:
    """Saliency ``alpha`` of the targets (Eq. 7) and ``s_j`` of the top/bottom candidates (Eq. 10/12).

    Anything missing (fingerprints, model, targets, pool records) becomes a note, never an error;
    ``hint`` is a target file recorded by another run of the report, named in that note.
    """
    import torch

    from .batching import collate
    from .config import FingerprintConfig, ScoreConfig
    from .data import Renderer, load_records
    from .fingerprints import Fingerprints, token_saliency
    from .models import load_model, model_pad_id
    from .scoring import Scorer, pool_scores

    view = TokenView(run=run.label)
    if run.fingerprints_path is None:
        view.notes.append(f"{run.label}: no fingerprints.safetensors in {run.dir} (not a TRIM run): no token view.")
        return view
    spec = _model_spec(run, cfg)
    if spec is None:
        view.notes.append(f"{run.label}: no model recorded in run.json and no --model given: no token view.")
        return view
    dtype = cfg.dtype or (run.info.get("model") or {}).get("dtype") or "auto"
    key = f"{spec}|{cfg.device}|{dtype}"
    try:
        if key not in model_cache:
            model_cache[key] = load_model(spec, device=cfg.device, dtype=dtype)
        lm = model_cache[key]
    except (OSError, ValueError, RuntimeError) as exc:
        view.notes.append(f"{run.label}: model {spec!r} not available ({exc}): no token view.")
        return view
    fp = Fingerprints.load(run.fingerprints_path)
    want = (fp.meta.get("model") or {}).get("sha256")
    if want and want != lm.sha256:
        view.notes.append(
            f"{run.label}: the fingerprints were built with another model "
            f"({(fp.meta.get('model') or {}).get('name')}) than {spec!r}: no token view."
        )
        return view
    config = run.info.get("config", {})
    rc = _render_config(run.info)
    fc_raw = config.get("fingerprint", {}) or {}
    fc = FingerprintConfig(**{k: v for k, v in fc_raw.items() if k in FingerprintConfig.__dataclass_fields__})
    sc_raw = config.get("scoring", {}) or {}
    sc = ScoreConfig(**{k: v for k, v in sc_raw.items() if k in ScoreConfig.__dataclass_fields__})
    renderer = Renderer(lm.tokenizer, rc)
    content_renderer = Renderer(lm.tokenizer, replace(rc, scope="all", score_template=False))
    device = next(lm.model.parameters()).device
    pad = model_pad_id(lm.model)
    tok = lm.tokenizer

    # -- targets: alpha (Eq. 7) -------------------------------------------------------------
    targets = cfg.targets if cfg.targets is not None else _recorded_targets(run.info)
    if not targets:
        view.notes.append(
            "no --targets given (run.json does not record the target file): target saliency view skipped."
            + (
                f" Another run of this report used {hint}; pass --targets {hint} if it is this run's too."
                if hint
                else ""
            )
        )
    elif not Path(targets).exists():
        view.notes.append(f"target file {targets} not found: target saliency view skipped.")
    else:
        recs = load_records(targets, skip_invalid=True)[: cfg.n_targets]
        for rec in recs:
            seq = renderer(rec)
            batch = collate([seq], device, pad)
            alpha, _ = token_saliency(lm.model, batch, fc.layers, fc.row_weight, fc.col_weight)
            a = alpha[0].float().cpu().numpy()
            active = (seq.scope_mask & ~seq.special_mask).tolist()
            notes = [
                "" if act else ("special token: not fingerprinted" if sp else "out of scope: not fingerprinted")
                for act, sp in zip(active, seq.special_mask.tolist(), strict=True)
            ]
            view.targets.append(
                _cut(
                    TokenRow(
                        title=f"target {rec.id}",
                        tokens=_tok_strings(tok, seq.input_ids),
                        token_ids=seq.input_ids.tolist(),
                        values=a.tolist(),
                        active=active,
                        notes=notes,
                        header={"tokens": len(seq)},
                        template=_template_mask(content_renderer, rec, seq),
                    ),
                    cfg.max_tokens,
                )
            )

    # -- candidates: s_j (Eq. 10/12) ---------------------------------------------------------
    try:
        scorer = Scorer(
            lm.model,
            fp,
            penalty=sc.penalty,
            mean_weight=sc.mean_weight,
            max_weight=sc.max_weight,
            coverage_weight=sc.coverage_weight,
        )
    except ValueError as exc:
        view.notes.append(f"{run.label}: {exc}: candidate view skipped.")
        return view
    m = scorer.matcher
    fp_ids = fp.token_ids
    o = run.order()
    finite = o[np.isfinite(run.score[o])]
    picks = [("top", k + 1, int(i)) for k, i in enumerate(finite[: cfg.n_examples])]
    picks += [("bottom", len(finite) - k, int(i)) for k, i in enumerate(finite[::-1][: cfg.n_examples])]
    missing = 0
    for which, position, row in picks:
        pidx = int(run.index[row])
        rec = pool.records.get(pidx)
        if rec is None:
            missing += 1
            continue
        seq = renderer(rec)
        batch = collate([seq], device, pad)
        hidden = scorer.forward_hidden(batch)
        s = m.token_scores(hidden, batch["input_ids"])[0].float().cpu().numpy()
        ids_t = batch["input_ids"][0]
        scored = (batch["scope_mask"][0] & ~batch["special_mask"][0] & m.scored[ids_t]).cpu().numpy()
        unseen = m.unseen[ids_t].cpu().numpy()
        rows_fp = m.row[ids_t].cpu().numpy()
        with torch.no_grad():
            re = pool_scores(m, batch, hidden, *scorer.weights)
        recomputed = float(re["score"][0])
        notes = []
        for j in range(len(seq)):
            if not scored[j]:
                notes.append(
                    "special token: not scored"
                    if seq.special_mask[j]
                    else ("out of scope: not scored" if not seq.scope_mask[j] else "unseen class: not scored")
                )
            elif unseen[j]:
                sur = int(fp_ids[rows_fp[j]])
                notes.append(f"unseen class → nearest fingerprint {tok.decode([sur])!r} (id {sur}), λ={sc.penalty}")
            else:
                notes.append("")
        cols = run.columns
        header = {"rank": position, "score": float(run.score[row])}
        for k in ("mean", "max", "coverage", "n_scored", "n_unseen", "n_tokens"):
            if k in cols:
                header[k] = float(cols[k][row]) if cols[k].dtype.kind == "f" else int(cols[k][row])
        if np.isfinite(recomputed) and not sc.idf and abs(recomputed - header["score"]) > 1e-3:
            header["recomputed_score"] = recomputed
        tpl = _template_mask(content_renderer, rec, seq)
        if tpl:
            t = np.asarray(tpl, dtype=bool)
            for name, part in (("content", scored & ~t), ("template", scored & t)):
                header[f"mean s_j {name}"] = float(s[part].mean()) if part.any() else float("nan")
                header[f"n {name}"] = int(part.sum())
        tr = TokenRow(
            title=f"{which} #{header['rank']}: {run.ids[row]}",
            tokens=_tok_strings(tok, seq.input_ids),
            token_ids=seq.input_ids.tolist(),
            values=s.tolist(),
            active=scored.tolist(),
            notes=notes,
            header=header,
            template=tpl,
        )
        (view.top if which == "top" else view.bottom).append(_cut(tr, cfg.max_tokens))
    if missing:
        view.notes.append(f"{missing} candidate(s) could not be read back from the pool file: not shown.")
    return view


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
    runs = [load_run(d, cfg.pool) for d in run_dirs]
    _unique_labels(runs)
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
        hint = next((t for t in (_recorded_targets(r.info) for r in runs) if t), None)
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
