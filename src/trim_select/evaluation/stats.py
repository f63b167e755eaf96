"""Paired statistics over test rows: is method A better than method B on the same rows?

Every (method, seed, row) contributes one answer NLL and one correctness bit. Seeds are averaged
first, per row, so a row's value is ``x_m[i] = mean_s x_{m,s}[i]``. Method ``a`` against ``b`` is
the mean per-row difference

    d = (1/n) sum_i (x_a[i] - x_b[i])

with a 95% paired bootstrap interval: ``B`` resamples of the ``n`` row indices with replacement
(``numpy.random.default_rng(seed)``), the same indices for both methods, the mean difference of
each resample, and its 2.5% / 97.5% percentiles. A difference is *significant* when the interval
excludes 0. Rows are matched by id; a row missing for one method is an error, never dropped.

The row bootstrap does not see fine-tuning seed variance (seeds are averaged before it), so each
pair also carries its mean difference per seed (``per_seed``; a seedless method such as the untuned
base is paired with every seed of the other) and whether every seed's difference has the sign of
the mean (``seeds_agree``): a significant difference whose seeds disagree is not a ranking.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

METRICS: tuple[str, ...] = ("answer_nll", "correct")


@dataclass(frozen=True)
class BootstrapConfig:
    """How the paired interval is drawn."""

    resamples: int = 10_000
    confidence: float = 0.95
    seed: int = 0
    chunk: int = 1_000  # resamples per vectorised block (memory: chunk x n indices)

    def __post_init__(self) -> None:
        if self.resamples < 100:
            raise ValueError(f"resamples must be >= 100, got {self.resamples}")
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")


def write_rows(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Per-row results as gzipped jsonl (``method``, ``seed``, ``id``, ``answer_nll``, ``correct``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(dict(row), sort_keys=True) + "\n")
    tmp.replace(path)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows written by :func:`write_rows`."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def seed_averaged(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """``{method: {row id: mean over seeds of metric}}``; rows whose metric is ``None`` are errors."""
    acc: dict[str, dict[str, list[float]]] = {}
    for k, row in enumerate(rows):
        value = row.get(metric)
        if value is None:
            raise ValueError(f"row {k} (method {row.get('method')!r}, id {row.get('id')!r}) has no {metric!r}")
        acc.setdefault(str(row["method"]), {}).setdefault(str(row["id"]), []).append(float(value))
    return {m: {i: float(np.mean(v)) for i, v in by_id.items()} for m, by_id in acc.items()}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, config: BootstrapConfig = BootstrapConfig()
                     ) -> dict[str, float | bool | int]:
    """Mean of ``a - b`` and its paired percentile bootstrap interval (same resampled rows for both)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two equal-length 1-d arrays of >= 2 rows, got {a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    rng = np.random.default_rng(config.seed)
    means = np.empty(config.resamples, dtype=np.float64)
    for start in range(0, config.resamples, config.chunk):
        m = min(config.chunk, config.resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        means[start:start + m] = d[idx].mean(axis=1)
    tail = (1.0 - config.confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return {"mean_diff": float(d.mean()), "low": float(lo), "high": float(hi), "n": n,
            "excludes_zero": bool(lo > 0.0 or hi < 0.0)}


def pairwise(rows: Sequence[Mapping[str, Any]], metric: str,
             config: BootstrapConfig = BootstrapConfig()) -> list[dict[str, Any]]:
    """Every ordered-once pair ``(a, b)`` of methods: ``mean(x_a - x_b)`` over shared rows with its interval.

    The methods must have been scored on the same row ids (else ``ValueError`` naming the first
    difference). For ``answer_nll`` a negative difference means ``a`` is better; for ``correct``
    a positive one.
    """
    table = seed_averaged(rows, metric)
    by_seed = per_seed_values(rows, metric)
    methods = sorted(table)
    out: list[dict[str, Any]] = []
    for a, b in combinations(methods, 2):
        ids_a, ids_b = set(table[a]), set(table[b])
        if ids_a != ids_b:
            only = sorted(ids_a ^ ids_b)[:3]
            raise ValueError(f"methods {a!r} and {b!r} were scored on different rows (e.g. {only})")
        ids = sorted(ids_a)
        xa = np.array([table[a][i] for i in ids])
        xb = np.array([table[b][i] for i in ids])
        res = paired_bootstrap(xa, xb, config)
        per_seed = per_seed_differences(by_seed[a], by_seed[b])
        signs = {np.sign(v) for v in per_seed.values()}
        out.append({"metric": metric, "a": a, "b": b, **res, "per_seed": per_seed,
                    "seeds_agree": bool(per_seed) and signs == {np.sign(res["mean_diff"])}})
    return out


def per_seed_values(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {seed: {row id: metric}}}`` (seeds as strings; the untuned base's is ``"-"``)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        if row.get(metric) is not None:
            out.setdefault(str(row["method"]), {}).setdefault(str(row["seed"]), {})[str(row["id"])] = float(row[metric])
    return out


def per_seed_differences(sa: Mapping[str, Mapping[str, float]], sb: Mapping[str, Mapping[str, float]]
                         ) -> dict[str, float]:
    """``{seed: mean over rows of x_a - x_b}`` for each seed both methods have (numeric order), from
    two methods' :func:`per_seed_values`; a seedless method (the untuned base, seed ``"-"``) is paired
    with each seed of the other."""
    seeds = sorted((set(sa) | set(sb)) - {"-"}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    out: dict[str, float] = {}
    for seed in seeds or ["-"]:
        x, y = sa.get(seed, sa.get("-")), sb.get(seed, sb.get("-"))
        if x is not None and y is not None:
            out[seed] = float(np.mean([x[i] - y[i] for i in x]))
    return out


def pairwise_markdown(results: Sequence[Mapping[str, Any]], *, seeds: int | None = None) -> str:
    """A table of the pairwise differences; ``*`` marks intervals that exclude 0."""
    lines = ["| metric | a | b | mean(a - b) | 95% CI | rows | excludes 0 |", "|---|---|---|---:|---|---:|---|"]
    for r in results:
        lines.append(f"| {r['metric']} | {r['a']} | {r['b']} | {r['mean_diff']:+.4f} | "
                     f"[{r['low']:+.4f}, {r['high']:+.4f}] | {r['n']} | {'*' if r['excludes_zero'] else ''} |")
    note = f"\nSeeds averaged per row first ({seeds} seeds); paired bootstrap over test rows." if seeds else ""
    return "\n".join(lines) + note + "\n"
