"""Token-budget batching of length-sorted sequences, collation, and out-of-memory back-off.

Results never depend on how sequences are batched: batches are right-padded, attention is
causal, and every reduction masks padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from .data import TokenSequence

log = logging.getLogger(__name__)
T = TypeVar("T")


def plan_batches(lengths: Sequence[int] | np.ndarray, batch_tokens: int, max_batch_size: int = 256) -> list[
        np.ndarray]:
    """Group indices, longest first, so that ``len(batch) * max_len <= batch_tokens``.

    Deterministic: a stable sort by descending length (ties by index). A sequence longer than
    ``batch_tokens`` gets a batch of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_batch_size, batch_tokens // longest))
        batches.append(order[start:start + size])
        start += size
    return batches


def collate(seqs: Sequence[TokenSequence], device: torch.device, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``scope_mask``, ``special_mask``."""
    t = max(len(s) for s in seqs)
    b = len(seqs)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    attn = np.zeros((b, t), dtype=bool)
    scope = np.zeros((b, t), dtype=bool)
    special = np.zeros((b, t), dtype=bool)
    for r, s in enumerate(seqs):
        n = len(s)
        ids[r, :n] = s.input_ids
        attn[r, :n] = True
        scope[r, :n] = s.scope_mask
        special[r, :n] = s.special_mask
    as_t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    return {"input_ids": as_t(ids), "attention_mask": as_t(attn), "scope_mask": as_t(scope),
            "special_mask": as_t(special)}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_with_backoff(batch: np.ndarray, fn: Callable[[np.ndarray], T]) -> list[tuple[np.ndarray, T]]:
    """Run ``fn(batch)``; on out-of-memory split the batch in halves and retry each.

    Returns ``(indices, result)`` pairs covering ``batch`` in order.
    """
    try:
        return [(batch, fn(batch))]
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM we can split
        if not _is_oom(exc) or len(batch) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("out of memory on a batch of %d sequences; retrying as two of %d and %d",
                    len(batch), half, len(batch) - half)
        return run_with_backoff(batch[:half], fn) + run_with_backoff(batch[half:], fn)
