"""Random: uniform sampling without replacement (Appendix C), seeded.

The score of each pool example is its position in a seeded random permutation
(``numpy.random.default_rng(seed).permutation``), rescaled to (0, 1]: the top ``k`` by score are a
uniform random subset of size ``k``, and a larger budget extends a smaller one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import BaselineInputs, BaselineScores, SelectionCost, register


@dataclass(frozen=True)
class RandomConfig:
    """No settings beyond the shared seed (``BaselineConfig.seed``)."""


@register("random", RandomConfig, uses_model=False, summary="seeded uniform sample without replacement")
def score_random(inputs: BaselineInputs, config: RandomConfig, cost: SelectionCost) -> BaselineScores:
    """Score = rank in a seeded permutation (1.0 = drawn first)."""
    n = len(inputs.pool)
    rng = np.random.default_rng(inputs.base.seed)
    draw = rng.permutation(n)  # draw[r] = pool position drawn r-th
    score = np.empty(n, dtype=np.float64)
    score[draw] = (n - np.arange(n, dtype=np.float64)) / max(n, 1)
    return BaselineScores(score=score, info={"sampler": "numpy.random.default_rng(seed).permutation"})
