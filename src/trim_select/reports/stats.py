"""Stats: every number the figures show (``summary.json``), e.g. the Jaccard overlap matrix."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import ReportConfig
from .load import PoolData, RunData

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
