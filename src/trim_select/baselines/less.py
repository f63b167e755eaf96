"""LESS (Xia et al., 2024; Appendix C): LoRA gradient features, Adam-aware, matched to the targets.

Per warmup checkpoint ``c`` (``--model WARMUP_DIR``; see :mod:`.checkpoints`):

1. the checkpoint's LoRA adapter is loaded trainable on its base model (eval mode: no dropout);
2. every example gets its own gradient of the mean next-token loss over its **response tokens**
   (the warmup's label mask: assistant content + the end-of-turn token), one forward + backward
   per example (``batch size 1`` as in LESS);
3. pool examples use the **Adam update direction** built from the checkpoint's AdamW moments,
   exactly as LESS's ``obtain_gradients_with_adam``::

       m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,   u = m' / sqrt(v' + eps)

   (LESS applies no bias correction and puts ``eps`` inside the square root; ``bias_correction``
   switches to AdamW's ``m'/(1-b1^t) / (sqrt(v'/(1-b2^t)) + eps)`` with ``t`` = the checkpoint's
   Adam step + 1). Target examples use plain gradients (LESS's validation features are "sgd");
4. vectors are randomly projected to ``proj_dim`` (8192) dimensions (:mod:`.projection`, seeded,
   the same matrix for pool and targets and for every checkpoint) and L2-normalised;
5. matching follows LESS's ``matching.py`` (:mod:`.features`): mean cosine to the target
   examples of each sub-task group, learning-rate-weighted sum over checkpoints, max over groups.

Without checkpoints (``--model`` is a plain model) a fresh LoRA (rank ``lora_r``, seeded) is added
and both sides use plain (SGD) gradients; ``run.json`` says so. With peft's initialisation the
``B`` matrices start at zero, so only the ``B`` gradients are non-zero there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import RenderConfig, documented
from ..data import Renderer, TokenSequence
from ..models import (
    adapter_tokenizer_source,
    gradient_autocast_dtype,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
    weights_sha256,
)
from ..training.checkpoints import Checkpoint, load_optimizer_state, optimizer_step
from ..training.labels import label_loss_sum, label_mask
from .base import BaselineInputs, BaselineScores, SelectionCost, register
from .features import CheckpointMatching, unit, weighted_checkpoints
from .projection import KINDS, Projector


@dataclass(frozen=True)
class LESSConfig:
    proj_dim: int = documented(8192, "Projection dimension (LESS's).")
    projection: str = documented("auto", "auto|rademacher|gaussian|sjlt (auto: rademacher on GPU or small "
                                         "models, sparse JL on CPU).")
    lora_r: int = documented(128, "Fresh LoRA rank, without checkpoints (a checkpoint brings its own adapter).")
    lora_alpha: int = documented(512, "Fresh LoRA alpha, without checkpoints.")
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bias_correction: bool = documented(False, "AdamW bias correction in the Adam-aware gradient (LESS has none).")
    pool_gradient: str = documented("adam", "adam|sgd for pool examples (sgd when no optimizer state is "
                                            "available).")
    group_field: str | None = None  # target field naming sub-tasks; None: one group
    grad_batch: int = documented(16, "Examples projected together (memory: grad_batch x P floats).")
    # LESS scores with the warmup's checkpoints (Adam state, LR weights); without them only a fresh
    # LoRA with SGD gradients is possible, a different method, so it is refused unless asked for
    allow_no_warmup: bool = documented(False, "Run on a model without warmup checkpoints (a fresh LoRA and SGD "
                                              "gradients: not the paper's LESS; refused by default).")

    def __post_init__(self) -> None:
        if self.proj_dim < 1 or self.grad_batch < 1 or self.lora_r < 1:
            raise ValueError("proj_dim, grad_batch and lora_r must be positive")
        if self.projection not in KINDS:
            raise ValueError(f"projection must be one of {KINDS}, got {self.projection!r}")
        if self.pool_gradient not in ("adam", "sgd"):
            raise ValueError(f"pool_gradient must be adam or sgd, got {self.pool_gradient!r}")


# --------------------------------------------------------------------------------------------
# Adam-aware gradients
# --------------------------------------------------------------------------------------------


def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float = 0.9,
                   beta2: float = 0.999, eps: float = 1e-8, step: int | None = None) -> torch.Tensor:
    """LESS's Adam update direction of ``grad`` (``[..., P]``) given the moments (``[P]``).

    ``step=None``: LESS (``m'/sqrt(v'+eps)``, no bias correction). ``step=t``: AdamW with bias
    correction for update number ``t``.
    """
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    if step is None:
        return m / torch.sqrt(v + eps)
    return (m / (1 - beta1 ** step)) / (torch.sqrt(v / (1 - beta2 ** step)) + eps)


def _moments(ckpt: Checkpoint, names: list[str], params: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ``exp_avg``/``exp_avg_sq`` in parameter order; keys ``exp_avg/<adapter name>``."""
    by_kind: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    for name, moments in load_optimizer_state(ckpt.path).items():
        for kind, t in moments.items():
            by_kind[kind][_norm_name(name)] = t
    out = []
    for kind in ("exp_avg", "exp_avg_sq"):
        parts = []
        for n, p in zip(names, params, strict=True):
            t = by_kind[kind].get(_norm_name(n))
            if t is None:
                raise KeyError(f"{ckpt.optimizer_path} has no {kind} for {n}")
            if t.numel() != p.numel():
                raise ValueError(f"{ckpt.optimizer_path}: {kind} of {n} has {t.numel()} values, the "
                                 f"parameter {p.numel()}")
            parts.append(t.reshape(-1).float())
        out.append(torch.cat(parts))
    return out[0], out[1]


def _norm_name(name: str) -> str:
    """Parameter name without the adapter name and the peft wrapper prefix."""
    name = name.replace(".default.", ".")
    return name.removeprefix("base_model.model.")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _load_lora_model(base_spec: str, ckpt: Checkpoint | None, config: LESSConfig, seed: int,
                     device: torch.device, trust_remote_code: bool) -> tuple[Any, Any, dict[str, Any]]:
    """(peft model in eval mode with trainable LoRA, tokenizer, identity)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base_path = resolve_model_path(base_spec)
    base = load_causal_lm(base_path, trust_remote_code=trust_remote_code)
    tok_src = adapter_tokenizer_source(ckpt.path, base_path) if ckpt is not None else base_path
    tok = load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
    if ckpt is not None:
        model = PeftModel.from_pretrained(base, str(ckpt.path), is_trainable=True)
        ident = {"base": str(base_path), "adapter": str(ckpt.path), "checkpoint": ckpt.identity()}
    else:
        lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(config.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(base, lcfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # peft's init (kaiming-uniform A, zero B), from a seeded generator
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=g)
                elif "lora_B" in n:
                    p.zero_()
        ident = {"base": str(base_path), "adapter": f"fresh LoRA r={config.lora_r} alpha={config.lora_alpha} "
                                                    f"seed={seed}"}
    ident["base_sha256"] = weights_sha256(base_path)
    return model.to(device).eval(), tok, ident


def _trainable(model: Any) -> tuple[list[str], list[torch.Tensor]]:
    names, params = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            names.append(n)
            params.append(p)
    if not params:
        raise RuntimeError("the LoRA model has no trainable parameters")
    return names, params


# --------------------------------------------------------------------------------------------
# Per-example gradients
# --------------------------------------------------------------------------------------------


def training_sequences(tokenizer: Any, records: list[Any], max_length: int) -> list[TokenSequence]:
    """Render like the warmup: ``scope_mask`` = loss tokens (assistant content + end-of-turn).

    An example without assistant tokens (``text`` format) takes its loss on every non-special token.
    """
    cfg = RenderConfig(scope="response", score_template=False, max_length=max_length)
    renderer = Renderer(tokenizer, cfg)
    out = []
    for r in records:
        seq = renderer(r)
        labels = label_mask(seq)
        if labels[1:].sum() == 0:
            labels = ~seq.special_mask
        out.append(TokenSequence(seq.input_ids, labels, seq.special_mask, seq.n_truncated))
    return out


class GradientFeaturizer:
    """Per-example LoRA gradients of one model, projected and normalised in groups."""

    def __init__(self, model: Any, projector: Projector, device: torch.device, autocast: torch.dtype | None,
                 cost: SelectionCost, grad_batch: int = 16):
        self.model, self.projector, self.device = model, projector, device
        self.autocast, self.cost, self.grad_batch = autocast, cost, grad_batch
        self.names, self.params = _trainable(model)
        self.n_params = sum(p.numel() for p in self.params)

    def gradient(self, seq: TokenSequence) -> torch.Tensor:
        """Flat ``[P]`` gradient of the mean loss over the sequence's label tokens."""
        ids = torch.as_tensor(seq.input_ids, device=self.device)[None]
        labels = torch.as_tensor(seq.scope_mask, device=self.device)[None]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
                 "scope_mask": labels}
        n_labels = int(labels[:, 1:].sum())
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = label_loss_sum(self.model, batch) / max(n_labels, 1)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self.cost.forward(1, len(seq))
        self.cost.backward(1, len(seq))
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(grads, self.params, strict=True)])

    def features(self, seqs: list[TokenSequence], transform: Any = None, bar: Any = None) -> torch.Tensor:
        """``[N, k]`` unit projected features; ``transform(grad [P]) -> [P]`` (Adam) if given."""
        out = torch.zeros(len(seqs), self.projector.dim)
        buf = torch.zeros(min(self.grad_batch, max(len(seqs), 1)), self.n_params, device=self.device)
        for start in range(0, len(seqs), self.grad_batch):
            chunk = seqs[start:start + self.grad_batch]
            for i, s in enumerate(chunk):
                g = self.gradient(s)
                buf[i] = transform(g) if transform is not None else g  # per row: O(P) temporaries
                if bar is not None:
                    bar.update(1)
            t0 = time.perf_counter()
            out[start:start + len(chunk)] = unit(self.projector.project(buf[:len(chunk)])).cpu()
            self.cost.timed("projection", t0)
        return out


# --------------------------------------------------------------------------------------------
# The baseline
# --------------------------------------------------------------------------------------------


def less_checkpoints(inputs: BaselineInputs, config: LESSConfig) -> tuple[list[Checkpoint], np.ndarray]:
    """The warmup checkpoints LESS scores with and their learning-rate weights (one weight 1 for
    the fresh-LoRA variant); refuses a plain model unless ``allow_no_warmup``."""
    base_cfg = inputs.base
    chosen, weights = weighted_checkpoints(base_cfg.model, base_cfg.checkpoints)
    if not chosen and not config.allow_no_warmup:
        raise ValueError(f"LESS needs warmup checkpoints: {base_cfg.model!r} has none. Give --model a warmup "
                         "folder (trim-select warmup --pool POOL --out WARM), or allow the fresh-LoRA SGD "
                         "variant explicitly (--less-allow-no-warmup; not the paper's LESS)")
    return chosen, weights


def pool_transform(ckpt: Checkpoint | None, config: LESSConfig, feat: GradientFeaturizer,
                   device: torch.device) -> tuple[Any, str]:
    """``(transform, gradient type)`` of pool gradients at ``ckpt``: LESS's Adam direction from the
    checkpoint's moments (``adam``), or none (``sgd``) without a checkpoint or optimizer state."""
    if ckpt is None or config.pool_gradient != "adam" or not ckpt.optimizer_path.exists():
        return None, "sgd"
    m, v = (t.to(device) for t in _moments(ckpt, feat.names, feat.params))
    step = optimizer_step(ckpt.path) + 1 if config.bias_correction else None
    kw = {"beta1": config.adam_beta1, "beta2": config.adam_beta2, "eps": config.adam_eps, "step": step}

    def transform(g: torch.Tensor) -> torch.Tensor:
        return adam_direction(g, m, v, **kw)

    return transform, "adam"


def less_info(config: LESSConfig, chosen: list[Checkpoint], weights: np.ndarray, groups: list[str],
              projection: str | None, grad_types: list[str], autocast: torch.dtype | None) -> dict[str, Any]:
    """``run.json``'s description of a LESS run."""
    info: dict[str, Any] = {
        "projection": projection, "proj_dim": config.proj_dim,
        "pool_gradient": sorted(set(grad_types)), "target_gradient": "sgd",
        "adam": "LESS (no bias correction, eps inside sqrt)" if not config.bias_correction
        else "AdamW with bias correction",
        "matching": "LESS matching.py: LR-weighted sum over checkpoints of the mean cosine to the targets "
                    "of each group, max over groups",
        "loss": "mean next-token loss over response tokens (assistant content + end-of-turn), batch size 1",
        "checkpoints": [c.identity() for c in chosen] or None, "checkpoint_weights": weights.tolist(),
        "groups": groups, "warmup": bool(chosen),
        "autocast": str(autocast).replace("torch.", "") if autocast else None,
    }
    if not chosen:
        info["note"] = ("plain model without warmup checkpoints: a fresh seeded LoRA was added and plain "
                        "(SGD) gradients were used for pool and targets (no Adam state to use)")
    return info


@register("less", LESSConfig, uses_model=True,
          summary="LoRA gradient features (Adam-aware, projected), LR-weighted over warmup checkpoints")
def score_less(inputs: BaselineInputs, config: LESSConfig, cost: SelectionCost) -> BaselineScores:
    """LESS influence scores: projected Adam-aware gradients vs. target gradients, per checkpoint."""
    from tqdm.auto import tqdm

    base_cfg, rt = inputs.base, inputs.base.runtime
    device = resolve_device(rt.device)
    autocast = gradient_autocast_dtype(rt.dtype, device)
    chosen, weights = less_checkpoints(inputs, config)
    match = CheckpointMatching(len(inputs.pool), inputs.targets, config.group_field, len(chosen) > 1)
    pool_seqs = target_seqs = None
    identities, grad_types = [], []
    projection = None
    for ckpt, w in zip(chosen or [None], weights, strict=True):
        t0 = time.perf_counter()
        base_spec = ckpt.base if ckpt is not None else base_cfg.model
        model, tok, ident = _load_lora_model(base_spec, ckpt, config, base_cfg.seed, device,
                                             rt.trust_remote_code)
        cost.model_loads += 1
        cost.timed("load_model", t0)
        if pool_seqs is None:
            t0 = time.perf_counter()
            pool_seqs = training_sequences(tok, inputs.pool, base_cfg.render.max_length)
            target_seqs = training_sequences(tok, inputs.targets, base_cfg.render.max_length)
            cost.timed("render", t0)
        _, params = _trainable(model)
        n_params = sum(p.numel() for p in params)
        projector = Projector(n_params, config.proj_dim, config.projection, seed=base_cfg.seed, device=device)
        projection = projector.kind
        feat = GradientFeaturizer(model, projector, device, autocast, cost, config.grad_batch)
        transform, grad_type = pool_transform(ckpt, config, feat, device)
        grad_types.append(grad_type)
        identities.append(ident | {"lora_parameters": n_params, "pool_gradient": grad_type})

        t0 = time.perf_counter()
        label = ckpt.path.name if ckpt is not None else "fresh-lora"
        tgt = feat.features(target_seqs)
        bar = tqdm(total=len(inputs.pool), desc=f"LESS grads {label}", unit="ex", disable=not inputs.progress,
                   dynamic_ncols=True)
        pool_feat = feat.features(pool_seqs, transform, bar)
        bar.close()
        match.add(pool_feat, tgt, w, ckpt.step if ckpt is not None else None)
        cost.timed("gradients", t0)
        del model, feat, pool_feat
    n_loss = np.array([int(s.scope_mask[1:].sum()) for s in pool_seqs], dtype=np.int64)
    score, columns = match.finish(pool_seqs, {"n_loss_tokens": n_loss})
    return BaselineScores(score=score, columns=columns,
                          info=less_info(config, chosen, weights, match.names, projection, grad_types, autocast),
                          model=identities[0] if len(identities) == 1 else {"checkpoints": identities})
