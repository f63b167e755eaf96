"""LoRA SFT through TRL: :func:`train_lora_trl` is :func:`~trim_select.training.lora.train_lora` on
``trl.SFTTrainer`` + ``SFTConfig`` + ``peft.LoraConfig`` (same signature, result, output layout,
caching and resume; ``docs/SPEC.md`` "Warmup", paper Table 7).

What is TRL's and what stays ours, and why:

- **Loss on the completion only**: TRL's own path. The rows are handed over pre-tokenised
  (``input_ids`` + ``completion_mask`` = :func:`~trim_select.training.labels.label_mask`, so TRL never
  re-renders a chat template) with ``completion_only_loss=True``; TRL turns the mask into ``-100``
  labels and the Trainer divides each step's summed token loss by the step's label-token count
  (``num_items_in_batch``), which is our loss (mean over the step's response tokens).
- **Optimizer, schedule, clipping, accumulation, bf16 autocast, checkpoint/resume**: the Trainer's
  (AdamW ``adamw_torch``, ``linear``/``constant_with_warmup`` with ``ceil(warmup_ratio * T)`` warmup
  steps, ``per_device_train_batch_size * gradient_accumulation_steps = recipe.batch_size``).
  Resume is ``resume_from_checkpoint`` on the Trainer's ``OUT/hf/checkpoint-N`` (transformers
  5.x reads optimizer, scheduler and RNG files with ``weights_only=True``).
- **Data order** stays ours: the Trainer's ``RandomSampler`` would give other rows to each step
  than ``train_lora``, so a sampler yields :func:`~trim_select.training.labels.epoch_order`, each
  step's rows longest first as ``train_lora`` runs them (:func:`step_order`).
- **Dropout RNG** stays ours: a callback seeds torch with ``(seed, step)`` at each step's start,
  as ``train_lora`` does, so the masks do not depend on where a run was resumed. The caller's
  global RNG states (python, numpy, torch) are restored afterwards (``Trainer`` calls ``set_seed``).
- **Checkpoint layout** stays ours: an ``on_save`` callback writes ``OUT/checkpoints/step-NNNNNN``
  (adapter safetensors, AdamW moments in ``optimizer.safetensors`` keyed like the adapter file,
  ``state.json``) from the live optimizer, so LESS/RDS and the warmup read them without unpickling;
  the Trainer's own folder ``OUT/hf`` keeps only the newest checkpoint and is removed when the run
  ends, leaving the layout of ``train_lora``.
- **LoRA init** is TRL's: ``SFTTrainer`` calls ``set_seed(seed)`` right before ``get_peft_model``,
  the ``torch.manual_seed(seed)`` that ``train_lora`` uses, so both start from the same adapter.

On CPU (float32, one row per forward) a run reproduces ``train_lora``'s losses and final adapter to
float rounding (``tests/test_trl_training.py``). Gaps, and why ``train_lora`` is kept beside it:

- The Trainer runs a fixed number of rows per forward (:func:`micro_batch_rows`), not
  ``train_lora``'s per-step token budget (``micro_batch_tokens`` only sizes that number on GPUs),
  so on a GPU its padded micro-batches, and with them the float rounding, differ from ours.
- TRL's fused LM head also computes the entropy and top-1 accuracy of every label token (logged
  metrics; extra cost measured by ``benchmarks/training_backends.py``).
- The progress bar is the Trainer's (``desc`` is not shown); the Trainer's resume files in
  ``OUT/hf`` are ``torch.save`` pickles read back with ``weights_only=True`` (the RNG file with
  numpy's array types allow-listed, as transformers does); LESS never reads them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import config_hash, to_dict
from ..data import Record
from ..models import LoadedModel, load_trainable_base, resolve_device, resolve_train_dtype
from .checkpoints import (
    CHECKPOINT_PREFIX,
    adapter_key,
    checkpoint_state,
    list_checkpoints,
    save_checkpoint,
    write_final,
)
from .labels import epoch_order, training_data
from .lora import LoraRecipe, TrainResult, finish_run, lora_config, open_run, run_base, train_key

log = logging.getLogger(__name__)

HF_DIR = "hf"  # OUT/hf: the Trainer's own checkpoint-N folders (resume only; removed at the end)
BACKEND = "trl"


def trl_key(records: Sequence[Record], recipe: LoraRecipe, base: Path) -> str:
    """Settings key of a TRL run: ``train_lora``'s key plus the backend (a folder trained by one
    backend is never resumed by the other)."""
    return config_hash({"key": train_key(records, recipe, base)}, {"backend": BACKEND})


def micro_batch_rows(recipe: LoraRecipe, device: torch.device) -> int:
    """Rows per forward/backward (the Trainer's ``per_device_train_batch_size``).

    ``micro_batch_size`` when set; else 1 on CPU (no padding, as ``train_lora``) and
    ``micro_batch_tokens // max_length`` elsewhere (Table 7: 4096 // 2048 = 2 rows, accumulated 32
    times); lowered to the largest divisor of ``batch_size`` so that accumulation gives the batch.
    """
    m = recipe.micro_batch_size or (1 if device.type == "cpu" else recipe.micro_batch_tokens // recipe.max_length)
    m = max(1, min(m, recipe.batch_size))
    while recipe.batch_size % m:
        m -= 1
    return m


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restore python, numpy and torch (CPU + CUDA) RNG states on exit (the Trainer reseeds them)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def step_order(lengths: np.ndarray, seed: int, epoch: int, batch_size: int) -> np.ndarray:
    """Rows of one epoch as ``train_lora`` visits them: :func:`epoch_order` cut into steps of
    ``batch_size``, each step longest first (stable; its ``plan_batches`` order), so that every
    row meets the same dropout draws in both trainers."""
    order = epoch_order(len(lengths), seed, epoch)
    steps = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return np.concatenate([s[np.argsort(-lengths[s], kind="stable")] for s in steps])


class EpochOrderSampler(torch.utils.data.Sampler):
    """Yields :func:`step_order` of the current epoch; the Trainer calls :meth:`set_epoch`."""

    def __init__(self, lengths: np.ndarray, seed: int, batch_size: int) -> None:
        self.lengths, self.seed, self.batch_size, self.epoch = lengths, seed, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(step_order(self.lengths, self.seed, self.epoch, self.batch_size).tolist())


def sft_config(recipe: LoraRecipe, out: Path, n: int, device: torch.device, progress: bool) -> Any:
    """The ``SFTConfig`` of ``recipe`` for ``n`` training rows (``OUT/hf`` as output folder)."""
    from trl import SFTConfig

    micro = micro_batch_rows(recipe, device)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    amp = resolve_train_dtype(recipe.dtype, device)
    return SFTConfig(
        output_dir=str(out / HF_DIR), per_device_train_batch_size=micro,
        gradient_accumulation_steps=recipe.batch_size // micro, num_train_epochs=recipe.epochs,
        learning_rate=recipe.lr, lr_scheduler_type="linear" if recipe.schedule == "linear" else "constant_with_warmup",
        warmup_steps=math.ceil(total * recipe.warmup_ratio), weight_decay=recipe.weight_decay,
        adam_beta1=recipe.adam_beta1, adam_beta2=recipe.adam_beta2, adam_epsilon=recipe.adam_eps,
        max_grad_norm=recipe.max_grad_norm, optim="adamw_torch", seed=recipe.seed, data_seed=recipe.seed,
        bf16=amp == torch.bfloat16, fp16=False, use_cpu=device.type == "cpu",
        activation_checkpointing=recipe.gradient_checkpointing,  # transformers 5's name of gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
        save_strategy="steps", save_steps=recipe.save_steps or steps_per_epoch, save_only_model=False,
        logging_strategy="steps", logging_steps=1, report_to=[], disable_tqdm=not progress,
        push_to_hub=False, dataloader_num_workers=0, max_length=None, packing=False, padding_free=False,
        completion_only_loss=True, assistant_only_loss=False, shuffle_dataset=False, dataset_num_proc=None,
    )


def hf_checkpoint(out: Path, step: int) -> Path:
    return out / HF_DIR / f"checkpoint-{step}"


def resume_point(out: Path) -> tuple[Path | None, dict[str, Any]]:
    """(the Trainer checkpoint to resume from, our ``state.json`` at that step), newest first; a step
    needs both our folder and the Trainer's (a crash between the two writes falls back one step)."""
    for c in reversed(list_checkpoints(out)):
        hf = hf_checkpoint(out, c.step)
        if (hf / "trainer_state.json").exists():
            return hf, dict(c.state)
    return None, {}


class StepRecorder:
    """Our side of a TRL run: per-step dropout seed, history records, checkpoint conversion.

    Built as a ``transformers.TrainerCallback`` by :func:`make_callback` (transformers is imported
    lazily); ``add_loss`` is fed by the trainer's ``training_step`` (the exact, unrounded loss).
    """

    def __init__(self, recipe: LoraRecipe, out: Path, key: str, base: Path, lengths: np.ndarray,
                 n_labels: np.ndarray, state: dict[str, Any],
                 on_step: Callable[[int, dict[str, Any]], None] | None) -> None:
        self.recipe, self.out, self.key, self.base = recipe, out, key, base
        self.lengths, self.n_labels, self.on_step = lengths, n_labels, on_step
        self.steps_per_epoch = math.ceil(len(lengths) / recipe.batch_size)
        self.total = self.steps_per_epoch * recipe.epochs
        self.save_every = recipe.save_steps or self.steps_per_epoch
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        self.tokens, self.seconds = int(state.get("tokens", 0)), float(state.get("seconds", 0.0))
        self.last_ckpt_step = int(state.get("step", 0))
        self.names: dict[int, str] = {}
        self.loss, self.lr = 0.0, 0.0
        self._t0, self._seconds0 = time.perf_counter(), self.seconds

    def add_loss(self, loss: float) -> None:
        self.loss += loss

    def step_begin(self, step: int) -> None:
        torch.manual_seed(self.recipe.seed * 1_000_003 + step)  # dropout of this step only (as train_lora)
        self.loss = 0.0

    def record(self, step: int, grad_norm: float) -> dict[str, Any]:
        """History record of optimizer step ``step`` (1-based), with the rows :func:`epoch_order` gave it."""
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        bs = self.recipe.batch_size
        idx = epoch_order(len(self.lengths), self.recipe.seed, epoch)[k * bs:(k + 1) * bs]
        rec = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": self.loss, "lr": self.lr,
               "tokens": int(self.lengths[idx].sum()), "label_tokens": int(self.n_labels[idx].sum()),
               "grad_norm": grad_norm}
        self.tokens += rec["tokens"]
        self.seconds = self._seconds0 + time.perf_counter() - self._t0
        self.history.append(rec)
        if not self.save_due(step) and self.on_step is not None:
            self.on_step(step, rec)
        return rec

    def save_due(self, step: int) -> bool:
        return step == self.total or step % self.save_every == 0

    def save(self, step: int, model: Any, optimizer: Any) -> None:
        """Write ``OUT/checkpoints/step-NNNNNN`` from the live model and optimizer; prune older Trainer folders."""
        state = checkpoint_state(self.history, self.last_ckpt_step, self.tokens, self.seconds, self.total, self.key)
        dest = self.out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
        save_checkpoint(dest, model, optimizer, self.names, self.base, state)
        self.last_ckpt_step = step
        keep = hf_checkpoint(self.out, step)
        for old in (self.out / HF_DIR).glob("checkpoint-*"):
            if old != keep and old.is_dir():
                shutil.rmtree(old)
        if self.on_step is not None:
            self.on_step(step, self.history[-1])


def make_callback(rec: StepRecorder) -> Any:
    """The ``TrainerCallback`` that drives ``rec``."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            rec.step_begin(state.global_step)

        def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            rec.lr = float(optimizer.param_groups[0]["lr"])  # the rate this step used (scheduler steps after)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            done = rec.history[-1]["step"] if rec.history else 0
            if logs and "loss" in logs and state.global_step > done:
                rec.record(state.global_step, float(logs.get("grad_norm", float("nan"))))

        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kw: Any) -> None:
            rec.save(state.global_step, model, optimizer)

    return _Callback()


def make_trainer(net: Any, tokenizer: Any, dataset: Any, args: Any, lora: Any, rec: StepRecorder) -> Any:
    """An ``SFTTrainer`` whose sampler is :class:`EpochOrderSampler` and whose step losses reach ``rec``."""
    from trl import SFTTrainer

    class _Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
            return EpochOrderSampler(rec.lengths, rec.recipe.seed, rec.recipe.batch_size)

        def training_step(self, *a: Any, **kw: Any) -> torch.Tensor:
            loss = super().training_step(*a, **kw)
            rec.add_loss(float(loss))
            return loss

    with warnings.catch_warnings():  # peft asks a transformers 5 model for a deprecated attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _Trainer(model=net, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                        callbacks=[make_callback(rec)])


def _session(model: str | os.PathLike | LoadedModel, records: Sequence[Record], out: Path, recipe: LoraRecipe,
             key: str, progress: bool, trust_remote_code: bool,
             on_step: Callable[[int, dict[str, Any]], None] | None) -> tuple[StepRecorder, Path, torch.device]:
    """Train (or resume) in ``out``; returns the recorder, the base folder and the device."""
    from datasets import Dataset

    device = resolve_device(recipe.device)
    net, tokenizer, base_path = load_trainable_base(model, trust_remote_code)
    tokenizer = copy.deepcopy(tokenizer)  # SFTTrainer sets its pad token: never touch the caller's
    seqs, n_labels, lengths = training_data(tokenizer, records, recipe)
    net.config.use_cache = False
    dataset = Dataset.from_dict({"input_ids": [s.input_ids.tolist() for s in seqs],
                                 "completion_mask": [s.scope_mask.astype(np.int64).tolist() for s in seqs]})
    lora = lora_config(recipe)
    resume, state = resume_point(out)
    rec = StepRecorder(recipe, out, key, base_path, lengths, n_labels, state, on_step)
    trainer = make_trainer(net, tokenizer, dataset, sft_config(recipe, out, len(seqs), device, progress), lora, rec)
    rec.names = {id(p): adapter_key(n) for n, p in trainer.model.named_parameters() if p.requires_grad}
    if resume is not None:
        log.info("resuming %s from %s (step %d of %d)", out, resume.name, rec.last_ckpt_step, rec.total)
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return rec, base_path, device


def train_lora_trl(
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
    """:func:`~trim_select.training.lora.train_lora` on ``trl.SFTTrainer`` (see the module docstring).

    Same contract: loss on assistant tokens only, ``OUT/checkpoints/step-NNNNNN`` + ``OUT/final`` +
    ``OUT/train.json``, a rerun resumes from the last complete checkpoint or returns the finished
    run, other settings are refused unless ``overwrite``. ``on_step(step, record)`` runs after each
    optimizer step (after its checkpoint, if it has one). ``desc`` is accepted for signature
    compatibility; the Trainer draws its own progress bar.
    """
    del desc
    out = Path(out_dir)
    if not records:
        raise ValueError("train_lora_trl needs at least one record")
    base_path = run_base(model)
    key = trl_key(records, recipe, base_path)
    manifest = out / "train_manifest.json"
    if overwrite and manifest.exists() and json.loads(manifest.read_text()).get("key") != key:
        shutil.rmtree(out / HF_DIR, ignore_errors=True)  # open_run wipes the rest
    cached = open_run(out, key, overwrite, {"recipe": to_dict(recipe), "base": str(base_path),
                                            "n": len(records), "backend": BACKEND})
    if cached is not None:
        return cached
    with preserved_global_rng():
        rec, base, device = _session(model, records, out, recipe, key, progress, trust_remote_code, on_step)
    final = write_final(out, list_checkpoints(out)[-1])
    shutil.rmtree(out / HF_DIR, ignore_errors=True)
    return finish_run(out, final, key, rec.history, rec.seconds, rec.tokens, recipe, base, len(rec.lengths),
                      {"backend": BACKEND, "device": str(device),
                       "autocast_dtype": str(resolve_train_dtype(recipe.dtype, device)).replace("torch.", "")})
