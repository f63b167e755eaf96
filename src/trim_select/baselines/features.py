"""Shared pieces of the model-based baselines (RDS, LESS): target groups and LESS's matching rule.

LESS (Xia et al., 2024, ``less/data_selection/matching.py``) scores a pool example ``x`` against
validation examples ``v`` of a task with unit features ``f``::

    score(x) = max_g  mean_{v in g}  sum_c w_c <f_c(x), f_c(v)>

``c`` runs over warmup checkpoints (weights ``w_c``: learning rates summing to 1), ``g`` over the
task's sub-tasks (one group unless ``group_field`` names a target field, e.g. MMLU subjects).
With one group, ``mean_v <f(x), f(v)> = <f(x), mean_v f(v)>``: the dot product with the mean unit
target feature, which ranks exactly like the cosine to that mean when there is one checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import Record


def target_groups(targets: list[Record], field: str | None) -> tuple[list[str], list[np.ndarray]]:
    """Group names and target positions; one group ``all`` when ``field`` is None."""
    if not targets:
        raise ValueError("the target set is empty")
    if field is None:
        return ["all"], [np.arange(len(targets))]
    keys = [str(t.fields.get(field, "")) for t in targets]
    names = sorted(set(keys))
    return names, [np.array([i for i, k in enumerate(keys) if k == n]) for n in names]


def group_means(unit_targets: torch.Tensor, groups: list[np.ndarray]) -> torch.Tensor:
    """``[G, k]``: mean unit target feature per group."""
    return torch.stack([unit_targets[torch.as_tensor(g)].mean(0) for g in groups])


def unit(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)
