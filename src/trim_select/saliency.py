"""Attention-derived token saliency, Eq. 1-7 of the paper (docs/SPEC.md "Stage I").

The math (:func:`row_saliency`, :func:`column_saliency`, :func:`combine_saliency`) works on one
layer's post-softmax attention ``A`` of shape ``[B, H, T, T]`` and the boolean ``visible`` mask
(``[B, 1|H, T, T]``) that says which keys each query may see.

:class:`SaliencyRecorder` gets ``A`` without asking the model for attentions of every layer: it
registers a Transformers attention function that computes eager attention for the last ``L``
layers only, folds each layer's ``q``/``k`` sums into running totals and discards ``A`` at once,
and lets every other layer run SDPA. Peak memory is one layer's ``[B, H, T, T]``.
"""

from __future__ import annotations

import contextvars
import math
from typing import Any

import torch

EPS = 1e-8
ATTN_NAME = "trim_saliency"
_ACTIVE: contextvars.ContextVar[SaliencyRecorder | None] = contextvars.ContextVar("trim_rec", default=None)


def row_saliency(attn: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Row (query) saliency per head, Eq. 1-2: ``q_i = 1 - H_i / log n_i`` (0 when ``n_i < 2``).

    ``n_i`` counts the keys visible to query ``i`` by the mask, not ``A > 0``.
    Returns ``[B, H, T]``.
    """
    attn = attn.float()
    entropy = -(attn * torch.log(attn + EPS)).masked_fill(~visible, 0.0).sum(-1)  # Eq. 1
    n = visible.sum(-1).to(attn.dtype).expand_as(entropy)
    log_n = torch.log(n.clamp_min(2.0))
    q = 1.0 - entropy / log_n  # Eq. 2
    return torch.where(n >= 2, q, torch.zeros_like(q))


def column_saliency(attn: torch.Tensor, visible: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """Column (key) saliency per head, Eq. 4: ``k_j = sum_i A_ij / m_j`` over valid queries.

    ``m_j`` = number of valid (non-padding) queries that see key ``j``; 0 where ``m_j = 0``.
    ``query_valid`` is ``[B, T]``. Returns ``[B, H, T]``.
    """
    sees = visible & query_valid[:, None, :, None]
    total = attn.float().masked_fill(~sees, 0.0).sum(-2)
    m = sees.sum(-2).to(total.dtype).expand_as(total)
    return torch.where(m > 0, total / m.clamp_min(1.0), torch.zeros_like(total))


def combine_saliency(
    q_mean: torch.Tensor,
    k_mean: torch.Tensor,
    norm_mask: torch.Tensor,
    row_weight: float = 0.5,
    col_weight: float = 0.5,
) -> torch.Tensor:
    """Eq. 6-7: min-max scale ``K_raw`` over ``norm_mask`` positions, ``alpha = w_Q Q + w_K K``.

    ``q_mean``/``k_mean`` are Eq. 3/5 (means over layers and heads), ``[B, T]``; ``norm_mask`` marks
    the non-special, non-padding positions of each sequence (attention sinks such as BOS must not
    squash everyone else to 0).
    """
    big = torch.finfo(k_mean.dtype).max
    k_min = k_mean.masked_fill(~norm_mask, big).amin(-1, keepdim=True)
    k_max = k_mean.masked_fill(~norm_mask, -big).amax(-1, keepdim=True)
    has = norm_mask.any(-1, keepdim=True)
    k_min = torch.where(has, k_min, torch.zeros_like(k_min))
    k_max = torch.where(has, k_max, torch.zeros_like(k_max))
    k_scaled = (k_mean - k_min) / (k_max - k_min + EPS)  # Eq. 6
    return row_weight * q_mean + col_weight * k_scaled  # Eq. 7


class SaliencyRecorder:
    """Context manager: during a forward pass, accumulate Eq. 3/5 numerators for the last layers.

    Usage::

        rec = SaliencyRecorder(model, layers=6)
        with rec.capture(attention_mask):      # attention_mask: [B, T] (1 = token, 0 = padding)
            hidden = base(input_ids, attention_mask=attention_mask).last_hidden_state
        q_mean, k_mean = rec.means()           # [B, T] each
    """

    def __init__(self, model: Any, layers: int = 6):
        self.model = model
        n_layers = int(model.config.num_hidden_layers)
        self.n_layers_used = min(layers, n_layers)
        self.layer_ids = set(range(n_layers - self.n_layers_used, n_layers))
        self._q = self._k = None
        self._count = 0  # layer x head terms accumulated
        self._layers_seen = 0
        self._query_valid: torch.Tensor | None = None
        _register()

    def capture(self, attention_mask: torch.Tensor) -> _Capture:
        return _Capture(self, attention_mask)

    def _accumulate(self, attn: torch.Tensor, visible: torch.Tensor) -> None:
        valid = self._query_valid
        q = row_saliency(attn, visible).masked_fill(~valid[:, None, :], 0.0).sum(1)
        k = column_saliency(attn, visible, valid).sum(1)
        self._q = q if self._q is None else self._q + q
        self._k = k if self._k is None else self._k + k
        self._count += attn.shape[1]
        self._layers_seen += 1

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._q is None or self._count == 0:
            raise RuntimeError(
                "no attention was recorded: the model does not dispatch attention through "
                "transformers' AttentionInterface (or captured no layer)"
            )
        if self._layers_seen != self.n_layers_used:
            raise RuntimeError(f"recorded {self._layers_seen} attention layers, expected {self.n_layers_used}")
        return self._q / self._count, self._k / self._count


class _Capture:
    def __init__(self, rec: SaliencyRecorder, attention_mask: torch.Tensor):
        self.rec, self.mask = rec, attention_mask

    def __enter__(self) -> SaliencyRecorder:
        rec = self.rec
        rec._q = rec._k = None
        rec._count = rec._layers_seen = 0
        rec._query_valid = self.mask.bool()
        self._prev_impl = rec.model.config._attn_implementation
        rec.model.set_attn_implementation(ATTN_NAME)
        self._token = _ACTIVE.set(rec)
        return rec

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)
        self.rec.model.set_attn_implementation(self._prev_impl)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _trim_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Eager attention that reports probabilities to the active recorder (captured layers only)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if rec is None or layer not in rec.layer_ids:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    k = _repeat_kv(key, groups)
    v = _repeat_kv(value, groups)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    logits = torch.matmul(query.float(), k.float().transpose(2, 3)) * scale
    softcap = kwargs.get("softcap") or getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    t_q, t_k = logits.shape[-2:]
    if attention_mask is None:
        visible = torch.ones(t_q, t_k, dtype=torch.bool, device=logits.device).tril(t_k - t_q)[None, None]
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[..., :t_k]
    else:
        visible = attention_mask[..., :t_k] > torch.finfo(attention_mask.dtype).min / 2
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked (padding) rows
    rec._accumulate(probs, visible)
    out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, _trim_attention)
        AttentionMaskInterface.register(ATTN_NAME, eager_mask)
