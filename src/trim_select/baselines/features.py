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

from ..data import Record, TokenSequence
from ..training.checkpoints import Checkpoint, checkpoint_weights, choose_checkpoints, find_checkpoints


def target_groups(targets: list[Record], field: str | None) -> tuple[list[str], list[np.ndarray]]:
    """Group names and target positions; one group ``all`` when ``field`` is None."""
    if not targets:
        raise ValueError("the target set is empty")
    if field is None:
        return ["all"], [np.arange(len(targets))]
    keys = [str(t.fields.get(field, "")) for t in targets]
    names = sorted(set(keys))
    return names, [np.array([i for i, k in enumerate(keys) if k == n]) for n in names]


def weighted_checkpoints(model: str, which: str) -> tuple[list[Checkpoint], np.ndarray]:
    """The warmup checkpoints of ``model`` chosen by ``which`` and their weights ``w_c`` (one weight
    1 for a plain model without checkpoints)."""
    chosen = choose_checkpoints(find_checkpoints(model), which)
    return chosen, checkpoint_weights(chosen) if chosen else np.ones(1)


def group_means(unit_targets: torch.Tensor, groups: list[np.ndarray]) -> torch.Tensor:
    """``[G, k]``: mean unit target feature per group."""
    return torch.stack([unit_targets[torch.as_tensor(g)].mean(0) for g in groups])


def unit(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


class CheckpointMatching:
    """LESS's matching rule accumulated one checkpoint at a time (the formula above).

    ``add`` adds checkpoint ``c``'s ``w_c <f_c(x), mean_{v in g} f_c(v)>`` for every group ``g``;
    ``finish`` takes the max over groups and returns the score with the per-example columns.
    """

    def __init__(self, n_pool: int, targets: list[Record], group_field: str | None, per_checkpoint: bool):
        self.names, self.groups = target_groups(targets, group_field)
        self.total = torch.zeros(n_pool, len(self.groups), dtype=torch.float64)
        self.columns: dict[str, np.ndarray | list] = {}
        self.per_checkpoint = per_checkpoint  # a ``score_step_<step>`` column per checkpoint

    def add(self, pool: torch.Tensor, targets: torch.Tensor, weight: float, step: int | None) -> None:
        """Unit pool features ``[N, k]`` against unit target features ``[M, k]`` of one checkpoint."""
        per_group = (pool @ group_means(targets, self.groups).T).double()  # [N, G]
        self.total += float(weight) * per_group
        if self.per_checkpoint:
            self.columns[f"score_step_{step}"] = per_group.max(1).values.numpy()

    def finish(self, pool_seqs: list[TokenSequence], extra: dict[str, np.ndarray] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray | list]]:
        """``(score [N], columns)``: ``n_tokens``, ``extra``, ``n_truncated``, ``best_group`` (G > 1)."""
        columns = self.columns
        columns["n_tokens"] = np.array([len(s) for s in pool_seqs], dtype=np.int64)
        columns.update(extra or {})
        columns["n_truncated"] = np.array([s.n_truncated for s in pool_seqs], dtype=np.int64)
        if len(self.groups) > 1:
            columns["best_group"] = [self.names[i] for i in self.total.argmax(1).tolist()]
        return self.total.max(1).values.numpy(), columns
