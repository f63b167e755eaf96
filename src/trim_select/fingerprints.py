"""Stage I: saliency-weighted token fingerprints (Eq. 8-9).

For every token class ``t`` seen in scope in the target set::

    f_t = sum_{(v,i) in O_t} alpha_{v,i} h^_{v,i} / || sum alpha h^ ||      (Eq. 9)

with ``alpha`` from Eq. 7 (:mod:`trim_select.saliency`) and ``h^`` the unit-normalised last hidden
state (after the final norm), or that of ``hidden_layer`` N (docs/SPEC.md "Extensions", :mod:`.layers`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import collate, plan_batches, run_with_backoff
from .data import TokenSequence, as_sequence
from .layers import check_hidden_layer, select_hidden
from .models import base_model, embedding_matrix, model_pad_id
from .saliency import SaliencyRecorder, combine_saliency

NORM_FLOOR = 1e-12


class NoFingerprintError(ValueError):
    """No token class received a fingerprint (empty or fully out-of-scope target set)."""


@dataclass
class Fingerprints:
    """The dictionary F of Eq. 9: sorted ``token_ids`` and matching unit rows ``vectors``.

    ``nearest`` (optional) is the unseen-token map of Eq. 11 for the whole vocabulary, computed once
    with the model that built the fingerprints (:func:`nearest_rows`) and saved with them, so that
    Stage II workers, shards and Ray actors reuse it instead of recomputing it.
    """

    token_ids: np.ndarray  # int64 [F], strictly increasing
    vectors: np.ndarray  # float32 [F, d], unit rows
    counts: np.ndarray  # int64 [F], occurrences |O_t|
    meta: dict[str, Any] = field(default_factory=dict)
    nearest: np.ndarray | None = None  # int64 [V]: fingerprint row of every token id (Eq. 11)

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (atomic); ``meta`` goes into its JSON header."""
        from safetensors.numpy import save_file

        from .io import atomic_path

        with atomic_path(path) as tmp:
            tensors = {"token_ids": self.token_ids, "vectors": self.vectors, "counts": self.counts}
            if self.nearest is not None:
                tensors["nearest"] = self.nearest
            save_file(
                tensors,
                str(tmp),
                metadata={"trim_select": json.dumps(self.meta, sort_keys=True)},
            )

    @classmethod
    def load(cls, path: str | Path) -> Fingerprints:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {}).get("trim_select", "{}"))
            nearest = fh.get_tensor("nearest").astype(np.int64) if "nearest" in fh.keys() else None
            return cls(fh.get_tensor("token_ids").astype(np.int64), fh.get_tensor("vectors").astype(np.float32),
                       fh.get_tensor("counts").astype(np.int64), meta, nearest)

    def with_nearest(self, embeddings: torch.Tensor) -> Fingerprints:
        """A copy carrying the unseen-token map (Eq. 11) for ``embeddings`` (the input embedding matrix)."""
        return replace(self, nearest=nearest_rows(self.token_ids, embeddings))


@torch.no_grad()
def nearest_rows(token_ids: np.ndarray, embeddings: torch.Tensor, *, chunk: int = 8192) -> np.ndarray:
    """Eq. 11 for the whole vocabulary: the fingerprint row each token id is matched to.

    A fingerprinted id maps to its own row; every other id to the row of the fingerprinted class
    whose unit input embedding is nearest by cosine (ties to the smallest token id). One chunked
    ``[chunk, d] @ [d, F]`` matmul on the embeddings' device. Returns int64 ``[V]``.
    """
    vocab = int(embeddings.shape[0])
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"fingerprint token ids exceed the model's vocabulary ({vocab}): wrong model?")
    row = torch.zeros(vocab, dtype=torch.long)
    row[ids] = torch.arange(len(ids))
    if len(ids) == 0:
        return row.numpy()
    device = embeddings.device
    emb = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
    fp_emb = emb[ids.to(device)].T.contiguous()
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[ids] = True
    unseen_ids = torch.nonzero(~seen).squeeze(1)
    for start in range(0, len(unseen_ids), chunk):
        part = unseen_ids[start:start + chunk]
        row[part] = (emb[part.to(device)] @ fp_emb).argmax(dim=1).cpu()  # first max = smallest id (ids sorted)
    return row.numpy()


@torch.no_grad()
def token_saliency(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    layers: int = 6,
    row_weight: float = 0.5,
    col_weight: float = 0.5,
    *,
    hidden_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of a collated batch: ``(alpha [B,T], hidden state [B,T,d])``, the last hidden
    state or ``hidden_states[hidden_layer]``."""
    check_hidden_layer(model.config, hidden_layer)
    rec = SaliencyRecorder(model, layers)
    base = base_model(model)
    with rec.capture(batch["attention_mask"]):
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                   use_cache=False, output_hidden_states=hidden_layer is not None)
    q_mean, k_mean = rec.means()  # Eq. 3, Eq. 5
    norm_mask = batch["attention_mask"] & ~batch["special_mask"]
    alpha = combine_saliency(q_mean, k_mean, norm_mask, row_weight, col_weight)  # Eq. 6-7
    return alpha, select_hidden(out, hidden_layer)


@torch.no_grad()
def build_fingerprints(
    model: Any,
    targets: Iterable[Mapping[str, Any] | TokenSequence],
    layers: int = 6,
    row_weight: float = 0.5,
    col_weight: float = 0.5,
    *,
    batch_tokens: int = 8192,
    max_batch_size: int = 64,
    pad_id: int | None = None,
    hidden_layer: int | None = None,
) -> Fingerprints:
    """Stage I: the fingerprint dictionary of target sequences (Eq. 1-9), independent of batching and
    padding. ``targets``: mappings with ``input_ids``, optional ``scope_mask``/``special_mask``;
    ``hidden_layer`` N: the states of ``hidden_states[N]`` (extension; ``meta["hidden_layer"]``)."""
    seqs = [as_sequence(t) for t in targets]
    if not seqs:
        raise NoFingerprintError("the target set is empty")
    device = next(model.parameters()).device
    pad = pad_id if pad_id is not None else model_pad_id(model)
    n_layers = min(layers, int(model.config.num_hidden_layers))
    ids_all, w_all, h_all = [], [], []

    def run(idx: np.ndarray):
        batch = collate([seqs[i] for i in idx], device, pad)
        alpha, hidden = token_saliency(model, batch, layers, row_weight, col_weight, hidden_layer=hidden_layer)
        take = batch["attention_mask"] & batch["scope_mask"] & ~batch["special_mask"]
        h_hat = torch.nn.functional.normalize(hidden[take].double(), dim=-1)
        return batch["input_ids"][take].cpu(), alpha[take].double().cpu(), h_hat.cpu()

    for idx in plan_batches([len(s) for s in seqs], batch_tokens, max_batch_size):
        for _, (ids, w, h) in run_with_backoff(idx, run):
            ids_all.append(ids)
            w_all.append(w)
            h_all.append(h)

    ids = torch.cat(ids_all)
    if ids.numel() == 0:
        raise NoFingerprintError("no target token is in scope and non-special: nothing to fingerprint")
    classes, inverse = torch.unique(ids, sorted=True, return_inverse=True)  # Eq. 8: O_t
    weighted = torch.cat(w_all)[:, None] * torch.cat(h_all)
    sums = torch.zeros(len(classes), weighted.shape[1], dtype=torch.float64).index_add_(0, inverse, weighted)
    counts = torch.bincount(inverse, minlength=len(classes))
    norms = sums.norm(dim=-1)
    keep = norms >= NORM_FLOOR
    if not bool(keep.any()):
        raise NoFingerprintError("every token class has zero saliency mass: no fingerprint")
    vectors = (sums[keep] / norms[keep, None]).float()  # Eq. 9
    meta = {
        "layers": n_layers,
        "row_weight": row_weight,
        "col_weight": col_weight,
        "n_targets": len(seqs),
        "n_target_tokens": int(ids.numel()),
        "dropped_zero_norm_classes": int((~keep).sum()),
        "hidden_layer": hidden_layer,
    }
    fp = Fingerprints(classes[keep].numpy().astype(np.int64), vectors.numpy(),
                      counts[keep].numpy().astype(np.int64), meta)
    return fp.with_nearest(embedding_matrix(model))  # the unseen-token map, once, beside F
