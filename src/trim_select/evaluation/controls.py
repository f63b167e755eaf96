"""Controls for a fair comparison of selectors: equal training tokens, DSIR-style fill-up, and an
A/A order control.

``--match-tokens METHOD``: BM25's 5% can carry 40% more tokens than TRIM's 5%, so a loss gap may
be tokens, not choice. :func:`match_tokens` gives every method the coreset whose token total is
closest to METHOD's: the shortest prefix of the method's own ranking (best first) whose cumulative
token count reaches the target, or the one before it when that is closer. A method whose budget
coreset is larger is therefore trimmed from the bottom of its ranking; a smaller one is extended
with its next-ranked rows. Rows with a non-finite score (never selectable) are not in a ranking.

``--order-control METHOD``: the fine-tune sees a coreset in its given order (best first) before its
own seeded shuffling, so the same rows in another order train another model. The control trains
METHOD's rows once more in a seeded random order (:func:`shuffled_order`): its gap to METHOD is what
the order alone moves the metrics, a measured noise floor for the gaps between methods.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..selection import rank


def matched_label(method: str, reference: str) -> str:
    """The label of ``method``'s coreset at ``reference``'s token total (``--match-tokens``)."""
    return f"{method}@{reference}-tokens"


def shuffled_label(method: str) -> str:
    """The label of ``method``'s coreset in a shuffled training order (``--order-control``)."""
    return f"{method}~shuffled"


def method_of(label: str) -> str:
    """The method behind a label: itself, or the method of a :func:`matched_label` or :func:`shuffled_label`."""
    return label.split("@", 1)[0].split("~", 1)[0]


ORDER_SALT = 0x0A0A  # the shuffled order's stream is apart from every other use of the run's seed


def shuffled_order(positions: np.ndarray, seed: int) -> np.ndarray:
    """The same rows in a seeded random order that differs from the given one (when it can)."""
    positions = np.asarray(positions, dtype=np.int64)
    out = positions[np.random.default_rng([ORDER_SALT, int(seed)]).permutation(len(positions))]
    if len(out) > 1 and np.array_equal(out, positions):
        out = np.roll(out, 1)
    return out


def selectable_ranking(scores: np.ndarray) -> np.ndarray:
    """Pool positions best first (ties to the lower position), without ``-inf``/NaN scores."""
    s = np.asarray(scores, dtype=np.float64)
    order = rank(s)
    return order[np.isfinite(s[order]) | (s[order] == np.inf)]


def prefix_for_tokens(ranking: np.ndarray, tokens: np.ndarray, target: int) -> np.ndarray:
    """The prefix of ``ranking`` whose token total is closest to ``target`` (ties: the shorter one).

    Never empty when ``ranking`` is not; the whole ranking when even it holds fewer tokens.
    """
    ranking = np.asarray(ranking, dtype=np.int64)
    if len(ranking) == 0:
        return ranking
    if target < 1:
        raise ValueError(f"target tokens must be positive, got {target}")
    cum = np.cumsum(np.asarray(tokens, dtype=np.int64)[ranking])
    k = int(np.searchsorted(cum, target, side="left"))  # first prefix length - 1 reaching target
    if k >= len(cum):
        return ranking
    if k > 0 and target - cum[k - 1] <= cum[k] - target:
        return ranking[:k]
    return ranking[:k + 1]


def match_tokens(rankings: Mapping[str, np.ndarray], tokens: np.ndarray, budget: int,
                 reference: str) -> dict[str, np.ndarray]:
    """Per method, the coreset (pool positions, best first) with ``reference``'s token total.

    ``reference``'s own coreset is the first ``budget`` rows of its ranking and is kept as is.
    """
    if reference not in rankings:
        raise KeyError(f"--match-tokens {reference!r}: not among the methods {sorted(rankings)}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    tokens = np.asarray(tokens, dtype=np.int64)
    ref = np.asarray(rankings[reference], dtype=np.int64)[:budget]
    target = int(tokens[ref].sum())
    return {m: (ref if m == reference else prefix_for_tokens(r, tokens, target)) for m, r in rankings.items()}


def fill_to_budget(ranking: np.ndarray, chosen: np.ndarray, budget: int) -> np.ndarray:
    """``chosen`` followed by the next rows of ``ranking`` not in it, up to ``budget`` rows.

    For a method whose filter (DSIR's ``min_words``) leaves fewer than ``budget`` rows: every
    method then trains on the same number of rows. ``ranking`` holds every pool position.
    """
    chosen = np.asarray(chosen, dtype=np.int64)
    if len(chosen) >= budget:
        return chosen[:budget]
    taken = set(chosen.tolist())
    extra = [int(i) for i in np.asarray(ranking, dtype=np.int64) if int(i) not in taken]
    return np.concatenate([chosen, np.asarray(extra[:budget - len(chosen)], dtype=np.int64)])
