"""Token-budget batching of length-sorted sequences, collation, and out-of-memory back-off.

Results never depend on how sequences are batched: batches are right-padded, attention is
causal, and every reduction masks padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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


# Model families whose attention is plain causal self-attention over positions 0..T-1 (no ALiBi or
# other mask-derived biases, no prefix-LM / bidirectional parts): for them a right-padded batch
# needs no padding mask, since causal attention hides every later (padding) key from a real token.
CAUSAL_FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "olmo", "olmo2",
    "granite", "stablelm", "smollm3", "starcoder2", "gpt_neox", "cohere", "nemotron", "helium",
})
EXACT_ATTENTION = frozenset({"sdpa", "eager", "flash_attention_2", "flash_attention_3"})


def padding_mask_free(config: Any, padding_side: str = "right") -> tuple[bool, str]:
    """Whether a forward without the padding mask is exact at every real position, and why (not).

    Exact when batches are right-padded, the model family is plain causal full attention
    (:data:`CAUSAL_FAMILIES`), the attention implementation is sdpa/eager/flash (they build the
    causal mask themselves when given none), and nothing restricts or widens it: no sliding window,
    no chunked or bidirectional attention, no non-``full_attention`` layer types. Anything else
    (left padding, an unknown family or implementation) keeps the mask.
    """
    if padding_side != "right":
        return False, f"{padding_side} padding: padding keys precede real tokens"
    family = getattr(config, "model_type", None)
    if family not in CAUSAL_FAMILIES or getattr(config, "is_encoder_decoder", False):
        return False, f"model type {family!r} is not a known plain causal decoder"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in EXACT_ATTENTION:
        return False, f"attention implementation {impl!r}"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return False, f"sliding window {window}"
    if getattr(config, "attention_chunk_size", None) or not getattr(config, "is_causal", True):
        return False, "chunked or bidirectional attention"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return False, f"layer types {sorted(kinds)}"
    return True, "right padding, plain causal full attention"


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
