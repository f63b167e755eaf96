"""RDS (Hanawa et al., 2021; Appendix C, following LESS's implementation).

An example's representation is the last-layer hidden state (after the final norm,
``hidden_states[-1]``) of its **last non-padding token**, from one batched forward pass of the
rendered example (prompt and response, chat template, right padding). Representations are
L2-normalised and matched with LESS's rule (:mod:`.features`): the mean cosine to the target
examples, i.e. the dot product with the mean unit target representation, per checkpoint, summed
with learning-rate weights when ``--model`` is a warmup folder with several checkpoints (the paper
aggregates RDS over checkpoints). A plain model is one "checkpoint" of weight 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..batching import collate, plan_batches, run_with_backoff
from ..config import documented
from ..data import Renderer, TokenSequence
from ..models import LoadedModel, base_model, load_model
from .base import BaselineInputs, BaselineScores, SelectionCost, register
from .features import CheckpointMatching, unit, weighted_checkpoints


@dataclass(frozen=True)
class RDSConfig:
    group_field: str | None = documented(None, "Target field naming sub-tasks (mean per sub-task, max over "
                                               "them; default: one group).")


def model_identity(lm: LoadedModel) -> dict[str, Any]:
    p = next(lm.model.parameters())
    return {"name": lm.name, "path": lm.path, "sha256": lm.sha256, "class": type(lm.model).__name__,
            "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device)}


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


@torch.no_grad()
def last_token_states(lm: LoadedModel, seqs: list[TokenSequence], *, batch_tokens: int, max_batch_size: int,
                      cost: SelectionCost, bar: Any = None) -> torch.Tensor:
    """``[N, d]`` float32 last-layer hidden state of each sequence's last token (input order)."""
    base = base_model(lm.model)
    device = next(lm.model.parameters()).device
    pad = _pad_id(lm.tokenizer)
    out = torch.zeros(len(seqs), int(base.config.hidden_size))

    def run(idx: np.ndarray) -> torch.Tensor:
        batch = collate([seqs[i] for i in idx], device, pad)
        attn = batch["attention_mask"]
        h = base(input_ids=batch["input_ids"], attention_mask=attn.long(), use_cache=False).last_hidden_state
        pos = attn.sum(1) - 1  # right padding: the last real token
        return h[torch.arange(len(idx), device=device), pos].float().cpu()

    for idx in plan_batches([len(s) for s in seqs], batch_tokens, max_batch_size):
        for sub, reps in run_with_backoff(idx, run):
            out[torch.as_tensor(sub)] = reps
        cost.forward(len(idx), sum(len(seqs[i]) for i in idx))
        if bar is not None:
            bar.update(len(idx))
    return out


@dataclass(frozen=True)
class _PoolPass:
    key: str
    reps: torch.Tensor  # [N, d] unit vectors
    forward_passes: int
    tokens: int
    seconds: float


class _PoolPasses:
    """This process's pool passes of the current pool, one per model (a warmup's checkpoints each have
    one); a pass over another pool, or other batching, drops them (one pool at a time: ``N x d``
    floats per model)."""

    def __init__(self) -> None:
        self.pool = ""
        self.passes: dict[str, _PoolPass] = {}

    def get(self, pool: str, key: str) -> _PoolPass | None:
        return self.passes.get(key) if pool == self.pool else None

    def put(self, pool: str, done: _PoolPass) -> None:
        if pool != self.pool:
            self.pool, self.passes = pool, {}
        self.passes[done.key] = done


_POOL_PASSES = _PoolPasses()


def pool_tokens_digest(seqs: list[TokenSequence], batch_tokens: int, max_batch_size: int) -> str:
    """What the pool side of a pass depends on besides the model: every pool token id and the batch
    plan (padding changes the float sums in the last bits)."""
    import xxhash

    h = xxhash.xxh3_128()
    h.update(repr((batch_tokens, max_batch_size, len(seqs))).encode())
    for s in seqs:
        h.update(np.int64(len(s)).tobytes())
        h.update(np.ascontiguousarray(s.input_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def model_pass_key(identity: dict[str, Any]) -> str:
    """What the pool side of a pass depends on in the model: its weights hash, dtype and device."""
    return repr((identity["sha256"], identity["dtype"], identity["device"]))


def pool_representations(lm: LoadedModel, seqs: list[TokenSequence], identity: dict[str, Any], pool: str, *,
                         batch_tokens: int, max_batch_size: int, cost: SelectionCost,
                         progress: bool, desc: str = "RDS forward") -> tuple[torch.Tensor, bool]:
    """Unit last-token states of the pool and whether they came from an identical pass of this process.

    ``compare`` runs RDS once per task on the same pool and model: the pool side does not depend on
    the targets, so the second task reuses the first one's states when the pool (``pool``, its
    :func:`pool_tokens_digest`: token ids, batching) and the model (:func:`model_pass_key`: weights,
    dtype, device) are equal, and repeats its cost in ``cost`` (as TRIM's shared pool pass is reported
    for every task it served).
    Either way the pass's seconds go to ``forward``.
    """
    from tqdm.auto import tqdm

    key = model_pass_key(identity)
    done = _POOL_PASSES.get(pool, key)
    if done is not None:
        cost.forward(done.forward_passes, done.tokens)
        cost.add_seconds("forward", done.seconds)
        return done.reps, True
    before, t0 = (cost.forward_passes, cost.tokens), time.perf_counter()
    bar = tqdm(total=len(seqs), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    reps = unit(last_token_states(lm, seqs, batch_tokens=batch_tokens, max_batch_size=max_batch_size,
                                  cost=cost, bar=bar))
    bar.close()
    seconds = time.perf_counter() - t0
    cost.add_seconds("forward", seconds)
    _POOL_PASSES.put(pool, _PoolPass(key, reps, cost.forward_passes - before[0], cost.tokens - before[1],
                                     seconds))
    return reps, False


@register("rds", RDSConfig, uses_model=True,
          summary="cosine of the last token's last-layer hidden state to the target mean (LESS impl.)")
def score_rds(inputs: BaselineInputs, config: RDSConfig, cost: SelectionCost) -> BaselineScores:
    """LESS-style matching of last-token representations, LR-weighted over checkpoints."""
    base_cfg, rt = inputs.base, inputs.base.runtime
    chosen, weights = weighted_checkpoints(base_cfg.model, base_cfg.checkpoints)
    specs = [str(c.path) for c in chosen] or [base_cfg.model]
    n = len(inputs.pool)
    match = CheckpointMatching(n, inputs.targets, config.group_field, len(specs) > 1)
    pool_seqs: list[TokenSequence] | None = None
    target_seqs: list[TokenSequence] | None = None
    pool_key = ""  # the pool's tokens digest, set with pool_seqs
    identities, reused = [], []
    for spec, w, ckpt in zip(specs, weights, chosen or [None], strict=True):
        t0 = time.perf_counter()
        lm = load_model(spec, device=rt.device, dtype=rt.dtype, trust_remote_code=rt.trust_remote_code)
        cost.model_loads += 1
        cost.timed("load_model", t0)
        identities.append(model_identity(lm) | ({"checkpoint": ckpt.identity()} if ckpt else {}))
        if pool_seqs is None:  # every checkpoint shares the base tokenizer
            t0 = time.perf_counter()
            renderer = Renderer(lm.tokenizer, base_cfg.render)
            pool_seqs = [renderer(r) for r in inputs.pool]
            target_seqs = [renderer(r) for r in inputs.targets]
            cost.timed("render", t0)
            pool_key = pool_tokens_digest(pool_seqs, rt.batch_tokens, rt.max_batch_size)  # once, not per checkpoint
        t0 = time.perf_counter()
        kw = {"batch_tokens": rt.batch_tokens, "max_batch_size": rt.max_batch_size, "cost": cost}
        tgt = unit(last_token_states(lm, target_seqs, **kw))
        cost.timed("forward", t0)
        reps, was_reused = pool_representations(lm, pool_seqs, identities[-1], pool_key,
                                                batch_tokens=rt.batch_tokens, max_batch_size=rt.max_batch_size,
                                                cost=cost, progress=inputs.progress,
                                                desc=f"RDS {ckpt.path.name if ckpt else 'forward'}")
        reused.append(was_reused)
        match.add(reps, tgt, w, ckpt.step if ckpt else None)
        del lm
    score, columns = match.finish(pool_seqs)
    info = {"representation": "last non-padding token, last layer (after final norm)",
            "matching": "LESS: mean over targets of cosine (per group), LR-weighted over checkpoints",
            "checkpoints": [c.identity() for c in chosen] or None,
            "checkpoint_weights": weights.tolist(), "groups": match.names,
            "warmup": bool(chosen),
            "pool_states": "reused from this process's identical pass (its cost repeated)" if all(reused)
            else "computed"}
    if not chosen:
        info["note"] = "plain model (no warmup checkpoints): one model, weight 1"
    return BaselineScores(score=score, columns=columns, info=info,
                          model=identities[0] if len(identities) == 1 else {"checkpoints": identities})
