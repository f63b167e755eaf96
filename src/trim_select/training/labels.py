"""Training data: records -> sequences whose ``scope_mask`` is the label mask (assistant content and,
optionally, the end-of-turn token after it), the epoch order, and the summed label loss. Shared by
the trainer and the LESS baseline (same loss tokens for training and gradient features)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import RenderConfig
from ..data import Record, Renderer, TokenSequence

if TYPE_CHECKING:
    from .lora import LoraRecipe

log = logging.getLogger(__name__)


def training_renderer(tokenizer: Any, recipe: LoraRecipe) -> Renderer:
    """Renderer whose ``scope_mask`` is exactly the assistant-content mask."""
    cfg = RenderConfig(scope="response", score_template=False, max_length=recipe.max_length)
    return Renderer(tokenizer, cfg)


def label_mask(seq: TokenSequence, *, train_eos: bool = True) -> np.ndarray:
    """Tokens that carry loss: assistant content, plus (``train_eos``) the special token that
    directly follows each assistant span (the end-of-turn token), so the model learns to stop."""
    mask = seq.scope_mask & ~seq.special_mask
    if train_eos and len(mask) > 1:
        after = np.zeros_like(mask)
        after[1:] = seq.scope_mask[:-1] & ~seq.scope_mask[1:] & seq.special_mask[1:]
        mask = mask | after
    return mask


def training_sequence(record: Record, renderer: Renderer, *, train_eos: bool = True) -> TokenSequence:
    """Render ``record``; the returned sequence's ``scope_mask`` is its label mask."""
    seq = renderer(record)
    return TokenSequence(seq.input_ids, label_mask(seq, train_eos=train_eos), seq.special_mask,
                         seq.n_truncated)


def training_data(tokenizer: Any, records: Sequence[Record], recipe: LoraRecipe
                   ) -> tuple[list[TokenSequence], np.ndarray, np.ndarray]:
    """(sequences with at least one label token, their label counts, their lengths)."""
    renderer = training_renderer(tokenizer, recipe)
    seqs = [training_sequence(r, renderer, train_eos=recipe.train_eos) for r in records]
    n_labels = np.array([int(s.scope_mask[1:].sum()) for s in seqs], dtype=np.int64)  # token 0 has no context
    keep = np.flatnonzero(n_labels > 0)
    if keep.size == 0:
        raise ValueError("no record has an assistant (response) token to train on")
    if keep.size < len(seqs):
        log.warning("%d of %d records have no response token and are skipped",
                    len(seqs) - keep.size, len(seqs))
    seqs = [seqs[i] for i in keep]
    return seqs, n_labels[keep], np.array([len(s) for s in seqs], dtype=np.int64)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Example order of one epoch; recomputable from ``(seed, epoch)`` alone (resume)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def label_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over label positions (``scope_mask`` of the batch).

    Logits are computed only where the next token is a label (``logits_to_keep`` boolean mask), so
    the vocabulary projection never materialises for prompt tokens.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    labels = batch["scope_mask"] & attn
    keep = torch.zeros_like(labels)
    keep[:, :-1] = labels[:, 1:]  # position i predicts token i+1
    targets = ids[:, 1:][labels[:, 1:]]
    out = model(input_ids=ids, attention_mask=attn.long(), logits_to_keep=keep, use_cache=False)
    logits = out.logits
    if logits.ndim == 3:  # a model class without mask support in logits_to_keep
        logits = logits[keep]
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
