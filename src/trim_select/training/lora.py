"""LoRA SFT of a causal LM on :class:`~trim_select.data.Record` objects: the trainer the warmup, the
evaluation harness and the LESS baseline share (``docs/SPEC.md`` "Warmup"; paper Table 7).

Loss on assistant tokens only; float32 weights with autocast (:func:`trim_select.models.resolve_train_dtype`);
checkpoints in the layout of :mod:`trim_select.training.checkpoints`; resumable.

Determinism: the data order of epoch ``e`` is ``default_rng([seed, e]).permutation(n)``, LoRA init
and dropout of optimizer step ``s`` draw from torch generators seeded with ``(seed, s)`` inside
``torch.random.fork_rng`` (the caller's global RNG state is left untouched). A run interrupted and
resumed from a checkpoint therefore ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..batching import collate, plan_batches
from ..config import config_hash, to_dict
from ..data import Record, TokenSequence
from ..io import write_json
from ..models import LoadedModel, load_trainable_base, pad_id, resolve_device, resolve_model_path, resolve_train_dtype
from .checkpoints import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    adapter_key,
    checkpoint_state,
    list_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    write_final,
)
from .labels import epoch_order, label_loss_sum, training_data, training_renderer, training_sequence  # noqa: F401
from .recipe import TRAINERS, LoraRecipe, lr_at  # noqa: F401  (re-exported: their home is recipe.py)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_lora` produced (also in ``OUT/train.json``)."""

    out_dir: Path
    final: Path  # adapter folder of the last checkpoint (use as --model)
    checkpoints: tuple[Checkpoint, ...]
    history: tuple[dict[str, Any], ...]  # per optimizer step: step, epoch, loss, lr, tokens, grad_norm
    seconds: float  # training time summed over resumed sessions
    tokens: int
    label_tokens: int
    recipe: LoraRecipe
    base: str
    n_examples: int
    cached: bool = False  # True when the run was already complete and nothing was trained

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"final": str(self.final), "base": self.base, "recipe": to_dict(self.recipe),
                "n_examples": self.n_examples, "steps": len(self.history), "seconds": round(self.seconds, 3),
                "tokens": self.tokens, "label_tokens": self.label_tokens,
                "tokens_per_s": round(self.tokens_per_s, 2), "losses": self.losses,
                "checkpoints": [c.to_dict() for c in self.checkpoints], "history": list(self.history)}

    @classmethod
    def from_dict(cls, out_dir: Path, d: dict[str, Any], *, cached: bool = False) -> TrainResult:
        return cls(out_dir=out_dir, final=out_dir / "final", checkpoints=tuple(list_checkpoints(out_dir)),
                   history=tuple(d["history"]), seconds=float(d["seconds"]), tokens=int(d["tokens"]),
                   label_tokens=int(d["label_tokens"]), recipe=LoraRecipe.from_dict(d["recipe"]),
                   base=d["base"], n_examples=int(d["n_examples"]), cached=cached)


def train_key(records: Sequence[Record], recipe: LoraRecipe, base: Path) -> str:
    h = hashlib.sha256()
    for r in records:  # the messages, not r.raw: callers may build records in memory
        h.update(json.dumps([[m.role, m.content] for m in r.messages]).encode())
    return config_hash(recipe.key_fields(), {"base": str(base), "data": h.hexdigest(), "n": len(records)})


@dataclass
class _Session:
    """What one training session works on (built by :func:`_setup`)."""

    peft_model: Any
    optimizer: torch.optim.Optimizer
    params: dict[str, Any]  # adapter name -> trainable parameter
    seqs: list[TokenSequence]
    n_labels: np.ndarray
    lengths: np.ndarray
    device: torch.device
    amp_dtype: torch.dtype
    pad_id: int
    base_path: Path

    @property
    def names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.params.items()}


def lora_config(recipe: LoraRecipe) -> Any:
    """peft's ``LoraConfig`` of ``recipe`` (rank, alpha, dropout, target modules; no bias)."""
    from peft import LoraConfig

    return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=list(recipe.target_modules), bias="none", task_type="CAUSAL_LM")


def _setup(model: str | os.PathLike | LoadedModel, records: Sequence[Record], recipe: LoraRecipe,
           trust_remote_code: bool) -> _Session:
    """Load the base, render the data, add the seeded LoRA and build AdamW."""
    from peft import get_peft_model

    device = resolve_device(recipe.device)
    amp_dtype = resolve_train_dtype(recipe.dtype, device)
    net, tokenizer, base_path = load_trainable_base(model, trust_remote_code)
    seqs, n_labels, lengths = training_data(tokenizer, records, recipe)
    net.config.use_cache = False
    if recipe.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.enable_input_require_grads()
    lora = lora_config(recipe)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(recipe.seed)  # LoRA A init (B starts at zero)
        peft_model = get_peft_model(net, lora)
    peft_model.to(device)
    params = {adapter_key(name): p for name, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=recipe.lr,
                                  betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_eps,
                                  weight_decay=recipe.weight_decay)
    return _Session(peft_model, optimizer, params, seqs, n_labels, lengths, device, amp_dtype,
                    pad_id(tokenizer), base_path)


def _step(s: _Session, recipe: LoraRecipe, step: int, total: int, steps_per_epoch: int) -> dict[str, Any]:
    """One optimizer step (gradient accumulation over micro-batches); returns its history record."""
    epoch, k = divmod(step, steps_per_epoch)
    idx = epoch_order(len(s.seqs), recipe.seed, epoch)[k * recipe.batch_size:(k + 1) * recipe.batch_size]
    lr = lr_at(step, total, recipe)
    for g in s.optimizer.param_groups:
        g["lr"] = lr
    denom = float(s.n_labels[idx].sum())
    loss_total, step_tokens = 0.0, 0
    autocast = torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype != torch.float32)
    cuda_devices = [s.device.index or 0] if s.device.type == "cuda" else []
    micro_size = recipe.micro_batch_size or (1 if s.device.type == "cpu" else recipe.batch_size)
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(recipe.seed * 1_000_003 + step)  # dropout of this step only
        for micro in plan_batches(s.lengths[idx], recipe.micro_batch_tokens, micro_size):
            batch = collate([s.seqs[idx[j]] for j in micro], s.device, s.pad_id)
            with autocast:
                loss = label_loss_sum(s.peft_model, batch) / denom
            loss.backward()
            loss_total += float(loss.detach())
            step_tokens += int(s.lengths[idx[micro]].sum())
    grads = [p for p in s.params.values() if p.grad is not None]
    if recipe.max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, recipe.max_grad_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in grads])))
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": loss_total,
            "lr": lr, "tokens": step_tokens, "label_tokens": int(denom), "grad_norm": grad_norm}


def reuse_or_reset(out: Path, key: str, overwrite: bool) -> TrainResult | None:
    """A finished run with ``key`` in ``out`` (returned), or None; other settings raise or are wiped."""
    manifest = out / "train_manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("key") != key:
        if not overwrite:
            raise RuntimeError(f"{out} holds a training run with different settings (data, recipe or base "
                               "model); rerun with --overwrite to discard it or choose another --out")
        for p in ("checkpoints", "final", "train.json", "warmup.json"):
            target = out / p
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    done_file = out / "train.json"
    if done_file.exists() and (out / "final").is_dir():
        done = json.loads(done_file.read_text())
        if done.get("key") == key:
            return TrainResult.from_dict(out, done, cached=True)
    return None


def run_base(model: str | os.PathLike | LoadedModel) -> Path:
    """The resolved base-model folder a run of ``model`` trains on (part of its settings key)."""
    return (Path(model.path) if isinstance(model, LoadedModel) else resolve_model_path(model)).resolve()


def open_run(out: Path, key: str, overwrite: bool, manifest: dict[str, Any]) -> TrainResult | None:
    """The finished run with ``key`` in ``out`` (nothing to train), or None once ``out`` is ready
    for a new or resumed run and ``train_manifest.json`` (``key`` then ``manifest``) is written."""
    cached = reuse_or_reset(out, key, overwrite)
    if cached is not None:
        return cached
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train_manifest.json", {"key": key, **manifest})
    return None


def finish_run(out: Path, final: Path, key: str, history: list[dict[str, Any]], seconds: float, tokens: int,
               recipe: LoraRecipe, base: Path, n_examples: int, extra: dict[str, Any]) -> TrainResult:
    """The run's :class:`TrainResult`, written to ``train.json`` (the completion marker) with ``extra``."""
    result = TrainResult(out_dir=out, final=final, checkpoints=tuple(list_checkpoints(out)),
                         history=tuple(history), seconds=seconds, tokens=tokens,
                         label_tokens=int(sum(h["label_tokens"] for h in history)), recipe=recipe,
                         base=str(base), n_examples=n_examples)
    write_json(out / "train.json", {"key": key, **result.to_dict(), **extra})
    return result


@dataclass
class _Progress:
    """Where a run stands: optimizer steps done, tokens and training seconds so far, the history."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _resume(out: Path, s: _Session, total: int) -> _Progress:
    """The progress of the last checkpoint in ``out`` restored into ``s``, or a fresh start."""
    ckpts = list_checkpoints(out)
    if not ckpts:
        return _Progress()
    state = restore_checkpoint(ckpts[-1], s.peft_model, s.optimizer, s.params, s.device)
    p = _Progress(int(state["step"]), int(state["tokens"]), float(state["seconds"]), list(state["history"]))
    log.info("resuming %s from %s (step %d of %d)", out, ckpts[-1].name, p.step, total)
    return p


def _train_steps(s: _Session, recipe: LoraRecipe, out: Path, key: str, p: _Progress, total: int, bar: Any,
                 on_step: Callable[[int, dict[str, Any]], None] | None) -> None:
    """Optimizer steps ``p.step .. total``, a checkpoint every ``save_steps`` (or epoch) and at the end."""
    steps_per_epoch = math.ceil(len(s.seqs) / recipe.batch_size)
    last_ckpt_step, t_session, seconds_at_start = p.step, time.perf_counter(), p.seconds
    for step in range(p.step, total):
        rec = _step(s, recipe, step, total, steps_per_epoch)
        p.tokens += rec["tokens"]
        p.seconds = seconds_at_start + time.perf_counter() - t_session
        p.history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                        tok_s=f"{p.tokens / max(p.seconds, 1e-9):.0f}")
        bar.update(1)
        if step + 1 == total or (step + 1) % (recipe.save_steps or steps_per_epoch) == 0:
            state = checkpoint_state(p.history, last_ckpt_step, p.tokens, p.seconds, total, key)
            dest = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step + 1:06d}"
            save_checkpoint(dest, s.peft_model, s.optimizer, s.names, s.base_path, state)
            last_ckpt_step = step + 1
        if on_step is not None:
            on_step(step + 1, rec)


def train_lora(
    model: str | os.PathLike | LoadedModel,
    records: Sequence[Record],
    out_dir: str | Path,
    recipe: LoraRecipe = LoraRecipe(),
    *,
    progress: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    desc: str = "LoRA warmup",
) -> TrainResult:
    """LoRA SFT of ``model`` on ``records`` (loss on assistant tokens only); resumable.

    ``model``: a spec accepted by ``--model`` (``default``, HF folder, ``.gguf``) or a
    :class:`~trim_select.models.LoadedModel` (copied, never modified). Training runs in float32
    weights with autocast to ``recipe.dtype``. A rerun with the same records and recipe continues
    from the last checkpoint in ``out_dir`` (or returns at once when ``train.json`` says it is done);
    other settings in the same folder are refused unless ``overwrite``. ``on_step(step, record)`` is
    called after every optimizer step (progress hooks, tests); ``desc`` labels the progress bar.
    """
    out = Path(out_dir)
    if not records:
        raise ValueError("train_lora needs at least one record")
    base_path = run_base(model)
    key = train_key(records, recipe, base_path)
    cached = open_run(out, key, overwrite, {"recipe": to_dict(recipe), "base": str(base_path), "n": len(records)})
    if cached is not None:
        return cached
    s = _setup(model, records, recipe, trust_remote_code)
    total = math.ceil(len(s.seqs) / recipe.batch_size) * recipe.epochs
    p = _resume(out, s, total)
    s.peft_model.train()
    bar = tqdm(total=total, initial=p.step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    _train_steps(s, recipe, out, key, p, total, bar, on_step)
    bar.close()
    final = write_final(out, list_checkpoints(out)[-1])
    return finish_run(out, final, key, p.history, p.seconds, p.tokens, recipe, s.base_path, len(s.seqs),
                      {"device": str(s.device), "autocast_dtype": str(s.amp_dtype).replace("torch.", "")})
