"""Selection: rank by ``S`` descending, ties to the lower pool index, never select ``-inf``."""

from __future__ import annotations

import numpy as np

from .data import parse_budget


def rank(scores: np.ndarray) -> np.ndarray:
    """Pool positions ordered best first; ties broken by the lower position; ``-inf``/NaN last."""
    s = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isfinite(s) | (s == np.inf), -s, np.inf)
    return np.lexsort((np.arange(len(s)), key))


def select_top(scores: np.ndarray, budget: str | int | float) -> np.ndarray:
    """Positions of the coreset, best first. ``budget``: a count, ``'5%'`` or a fraction.

    Examples with ``S = -inf`` (nothing scored) are never selected, so the coreset can be smaller
    than the budget when fewer examples have a finite score.
    """
    s = np.asarray(scores, dtype=np.float64)
    k = parse_budget(budget, len(s))
    order = rank(s)
    eligible = order[np.isfinite(s[order]) | (s[order] == np.inf)]
    return eligible[:k]
