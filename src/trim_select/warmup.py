"""Warmup: LoRA fine-tuning of ``M_0`` on a seeded random share of the pool (SPEC.md "Warmup").

TRIM scores with a warmed-up model ``M_warmup`` (paper Section 3, "Setup and Notation"; Algorithm 3,
line 1): ``M_0`` is LoRA-fine-tuned on a random ``gamma = 5%`` of the pool with the recipe the paper
shares with LESS (Table 7), and Stage I and II run on the result. Table 8: scoring with the last
checkpoint beats an early one, which beats the raw pretrained model.

Three layers, each usable alone:

- :func:`train_lora` -- a plain PyTorch + peft LoRA SFT loop over :class:`~trim_select.data.Record`
  objects (loss on assistant tokens only), resumable from its checkpoints. The evaluation harness
  fine-tunes coresets with it as well.
- :func:`warmup` -- draws the seeded subset of a pool file and calls :func:`train_lora`.
- :func:`run_pipeline` -- warmup -> Stage I -> Stage II -> selection (``trim-select run``), every
  stage cached on disk, optionally aggregating scores over several checkpoints weighted by their
  learning rate (LESS-style, Xia et al. 2024; paper Appendix G (ii)).

Output layout of :func:`train_lora` (the checkpoint contract shared with the LESS baseline)::

    OUT/train_manifest.json            settings key (refuses to resume with other settings)
    OUT/checkpoints/step-000002/       adapter_model.safetensors, adapter_config.json (peft),
                                       trim_select_base.json {"base": <base model folder>},
                                       state.json {"step","epoch","learning_rate","loss","tokens",...},
                                       optimizer.safetensors (AdamW exp_avg/<name>, exp_avg_sq/<name>)
    OUT/final/                         the adapter of the last checkpoint (usable as --model)
    OUT/train.json                     completion marker: losses, time, tokens/s, checkpoints
    OUT/warmup.json                    (warmup only) + subset ids and indices, fraction, seed

Determinism: the data order of epoch ``e`` is ``default_rng([seed, e]).permutation(n)``, LoRA init
and dropout of optimizer step ``s`` draw from torch generators seeded with ``(seed, s)`` inside
``torch.random.fork_rng`` (the caller's global RNG state is left untouched). A run interrupted and
resumed from a checkpoint therefore ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import collate, plan_batches
from .config import FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig, config_hash, to_dict
from .data import Record, Renderer, TokenSequence, parse_budget, read_records
from .io import atomic_path, file_identity, write_json
from .models import LoadedModel, resolve_device, resolve_model_path

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
BASE_MARKER = "trim_select_base.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", BASE_MARKER)


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraRecipe:
    """LoRA SFT hyperparameters; defaults are the paper's Table 7 (shared with LESS).

    ``batch_size`` is the effective batch (examples per optimizer step); each step's examples are
    split into micro-batches of at most ``micro_batch_tokens`` padded tokens (Table 7: 2 x 2048 per
    device, accumulated 32 times), and the loss is the mean over all response tokens of the step,
    so the split never changes the update beyond float rounding.
    """

    lr: float = 2e-5  # AdamW learning rate (Table 7)
    schedule: str = "linear"  # linear decay after linear warmup (Table 7); or "constant"
    warmup_ratio: float = 0.03  # share of optimizer steps with linear warmup (Table 7)
    epochs: int = 4  # Table 7
    batch_size: int = 64  # effective batch in examples (Table 7: 2 x 32 accumulation)
    micro_batch_tokens: int = 4096  # padded tokens per forward/backward (runtime; Table 7: 2 x 2048)
    # max sequences per micro-batch (runtime). 0 = auto: 1 on CPU -- no padding, so SDPA drops the mask
    # and takes its flash kernel (SmolLM2 on a 2-core CPU: 4x faster in bf16, 3-5x less memory than
    # padded micro-batches) -- and only the token budget on GPUs
    micro_batch_size: int = 0
    max_length: int = 2048  # Table 7; longer examples keep their end (the response)
    lora_r: int = 128  # Table 7
    lora_alpha: int = 512  # Table 7
    lora_dropout: float = 0.1  # Table 7
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # Table 7
    weight_decay: float = 0.0  # HF Trainer default (LESS sets none)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # HF Trainer default; 0 disables clipping
    train_eos: bool = True  # also learn the end-of-turn token after each assistant turn (open-instruct)
    seed: int = 0  # data order, LoRA init, dropout
    dtype: str = "auto"  # auto: bf16 autocast on GPUs that support it, float32 on CPU; or float32|bf16
    device: str = "auto"  # auto: cuda if available, else cpu
    save_steps: int = 0  # 0: a checkpoint at the end of every epoch; N: every N optimizer steps
    gradient_checkpointing: bool = False  # trade compute for activation memory (large models)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.micro_batch_tokens < 1:
            raise ValueError("lr, epochs, batch_size and micro_batch_tokens must be positive")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"schedule must be 'linear' or 'constant', got {self.schedule!r}")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_r >= 1, lora_alpha > 0 and lora_dropout in [0, 1) required")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if self.micro_batch_size < 0:
            raise ValueError(f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be >= 0, got {self.save_steps}")
        if isinstance(self.target_modules, list):  # tolerate lists from JSON
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraRecipe:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "target_modules" else v) for k, v in d.items() if k in names})

    def key_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (runtime-only fields left out)."""
        d = to_dict(self)
        for k in ("device", "micro_batch_tokens", "micro_batch_size", "gradient_checkpointing"):
            d.pop(k)
        return d


def lr_at(step: int, total_steps: int, recipe: LoraRecipe) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    The HF ``get_linear_schedule_with_warmup`` schedule that LESS and the paper train with:
    ``W = ceil(warmup_ratio * T)`` warmup steps rising linearly from 0, then linear decay to 0.
    """
    warm = math.ceil(total_steps * recipe.warmup_ratio)
    if step < warm:
        return recipe.lr * step / max(1, warm)
    if recipe.schedule == "constant":
        return recipe.lr
    return recipe.lr * max(0.0, (total_steps - step) / max(1, total_steps - warm))


def resolve_train_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: ``auto`` is bf16 on GPUs that support it, float32 on CPU (SPEC "Warmup").

    Weights and optimizer state stay float32 (bf16 autocast as in HF Trainer's ``bf16=True``);
    float16 is not offered (it would need loss scaling).
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(table)}")
    return table[dtype]


# --------------------------------------------------------------------------------------------
# Data: records -> sequences whose scope_mask is the label mask
# --------------------------------------------------------------------------------------------


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


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Example order of one epoch; recomputable from ``(seed, epoch)`` alone (resume)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One saved training state (``OUT/checkpoints/step-NNNNNN``)."""

    path: Path
    step: int  # optimizer steps done
    epoch: float  # epochs done (fractional mid-epoch)
    learning_rate: float  # mean lr of the steps since the previous checkpoint (LESS's weight)
    loss: float  # mean training loss of those steps
    tokens: int  # tokens processed so far (non-padding, forward + backward)

    @property
    def name(self) -> str:
        return self.path.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "step": self.step, "epoch": self.epoch,
                "learning_rate": self.learning_rate, "loss": self.loss, "tokens": self.tokens}


def list_checkpoints(out_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints of a training folder, by step."""
    root = Path(out_dir) / "checkpoints"
    found = []
    for p in sorted(root.glob(f"{CHECKPOINT_PREFIX}*")) if root.is_dir() else []:
        state_path = p / STATE_FILE
        if not p.is_dir() or not state_path.exists():
            continue
        s = json.loads(state_path.read_text())
        found.append(Checkpoint(p, int(s["step"]), float(s["epoch"]), float(s["learning_rate"]),
                                float(s["loss"]), int(s["tokens"])))
    return sorted(found, key=lambda c: c.step)


def checkpoint_weights(checkpoints: Sequence[Checkpoint]) -> np.ndarray:
    """LESS-style aggregation weights: each checkpoint's learning rate over their sum.

    LESS (Xia et al. 2024) weights each checkpoint by the average learning rate of the epoch it
    closes; the paper (Appendix G (ii)) aggregates TRIM scores across warmup checkpoints the same
    way. Equal weights when every learning rate is 0.
    """
    lrs = np.asarray([c.learning_rate for c in checkpoints], dtype=np.float64)
    if lrs.size == 0:
        raise ValueError("no checkpoints to weight")
    if np.any(lrs < 0):
        raise ValueError("learning rates must be non-negative")
    total = lrs.sum()
    return lrs / total if total > 0 else np.full(lrs.size, 1.0 / lrs.size)


def load_optimizer_state(checkpoint: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW moments of a checkpoint: ``{adapter parameter name: {"exp_avg", "exp_avg_sq"}}``.

    Names are those of ``adapter_model.safetensors`` (LESS needs them for Adam-aware gradients).
    """
    from safetensors.torch import load_file

    flat = load_file(str(Path(checkpoint) / OPTIMIZER_FILE))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        kind, _, name = key.partition("/")
        if kind in ("exp_avg", "exp_avg_sq"):
            out.setdefault(name, {})[kind] = t
    return out


def _adapter_key(param_name: str, adapter: str = "default") -> str:
    """Parameter name in the model -> name in ``adapter_model.safetensors`` (as peft saves it)."""
    return param_name.replace(f".{adapter}", "")


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside ``final`` and rename it into place (a folder is complete or absent)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is not what a user expects of an output folder
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


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


class _Interrupt(Exception):
    """Raised by a test hook to simulate a crash between optimizer steps."""


def _load_base(model: str | os.PathLike | LoadedModel, trust_remote_code: bool) -> tuple[Any, Any, Path]:
    """(float32 causal LM in train mode, tokenizer, base folder) for LoRA training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, LoadedModel):
        path = Path(model.path).resolve()
        if (path / "adapter_config.json").exists():
            raise ValueError(f"{path} is a LoRA adapter; train on its base model (or merge and save it)")
        net = copy.deepcopy(model.model).float()  # never mutate the caller's model
        return net, model.tokenizer, path
    path = resolve_model_path(model).resolve()
    if (path / "adapter_config.json").exists():
        raise ValueError(f"{path} is a LoRA adapter; give its base model (warmup trains a fresh adapter)")
    net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                               trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return net, tok, path


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


def _train_key(records: Sequence[Record], recipe: LoraRecipe, base: Path) -> str:
    h = hashlib.sha256()
    for r in records:  # the messages, not r.raw: callers may build records in memory
        h.update(json.dumps([[m.role, m.content] for m in r.messages]).encode())
    return config_hash(recipe.key_fields(), {"base": str(base), "data": h.hexdigest(), "n": len(records)})


def _save_checkpoint(dest: Path, peft_model: Any, optimizer: torch.optim.Optimizer, names: dict[int, str],
                     base: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp))
        (tmp / BASE_MARKER).write_text(json.dumps({"base": str(base)}, indent=2) + "\n")
        tensors: dict[str, torch.Tensor] = {}
        adam_steps = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p)
                if not st:
                    continue
                name = names[id(p)]
                tensors[f"exp_avg/{name}"] = st["exp_avg"].detach().float().cpu().contiguous()
                tensors[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().float().cpu().contiguous()
                adam_steps.add(int(float(st["step"])))
        meta = {"format": "trim-select-adamw-v1", "adam_step": str(max(adam_steps, default=0)),
                "global_step": str(state["step"]),
                "rng": "per-step: torch.manual_seed(seed * 1000003 + step) inside fork_rng; "
                       "data order: numpy default_rng([seed, epoch])"}
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata=meta)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    _atomic_dir(dest, write)


def _restore(ckpt: Checkpoint, peft_model: Any, optimizer: torch.optim.Optimizer, params: dict[str, Any],
             device: torch.device) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = load_file(str(ckpt.path / "adapter_model.safetensors"))
    set_peft_model_state_dict(peft_model, weights)
    for name, p in params.items():  # exact: compare what was loaded
        if not torch.equal(p.detach().cpu(), weights[name].to(p.dtype)):
            raise RuntimeError(f"checkpoint {ckpt.path}: parameter {name} did not load")
    moments = load_optimizer_state(ckpt.path)
    with safe_open(str(ckpt.path / OPTIMIZER_FILE), "pt") as fh:
        adam_step = int((fh.metadata() or {}).get("adam_step", "0"))
    for name, p in params.items():
        if name in moments:
            optimizer.state[p] = {"step": torch.tensor(float(adam_step)),
                                  "exp_avg": moments[name]["exp_avg"].to(device, p.dtype),
                                  "exp_avg_sq": moments[name]["exp_avg_sq"].to(device, p.dtype)}
    return json.loads((ckpt.path / STATE_FILE).read_text())


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
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if not records:
        raise ValueError("train_lora needs at least one record")
    base_path = (Path(model.path) if isinstance(model, LoadedModel) else resolve_model_path(model)).resolve()
    key = _train_key(records, recipe, base_path)
    manifest = out / "train_manifest.json"
    done_file = out / "train.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("key") != key:
        if not overwrite:
            raise RuntimeError(f"{out} holds a training run with different settings (data, recipe or base "
                               "model); rerun with --overwrite to discard it or choose another --out")
        for p in ("checkpoints", "final", "train.json", "warmup.json"):
            target = out / p
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    if done_file.exists() and (out / "final").is_dir():
        done = json.loads(done_file.read_text())
        if done.get("key") == key:
            return TrainResult.from_dict(out, done, cached=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"key": key, "recipe": to_dict(recipe), "base": str(base_path), "n": len(records)})

    device = resolve_device(recipe.device)
    amp_dtype = resolve_train_dtype(recipe.dtype, device)
    net, tokenizer, base_path = _load_base(model, trust_remote_code)
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
    n_labels = n_labels[keep]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    n = len(seqs)

    net.config.use_cache = False
    if recipe.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.enable_input_require_grads()
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=list(recipe.target_modules), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(recipe.seed)  # LoRA A init (B starts at zero)
        peft_model = get_peft_model(net, lora)
    peft_model.to(device)
    params = {_adapter_key(name): p for name, p in peft_model.named_parameters() if p.requires_grad}
    names = {id(p): name for name, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=recipe.lr,
                                  betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_eps,
                                  weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    history: list[dict[str, Any]] = []
    start, tokens, seconds = 0, 0, 0.0
    ckpts = list_checkpoints(out)
    if ckpts:
        state = _restore(ckpts[-1], peft_model, optimizer, params, device)
        start, tokens, seconds = int(state["step"]), int(state["tokens"]), float(state["seconds"])
        history = list(state["history"])
        log.info("resuming %s from %s (step %d of %d)", out, ckpts[-1].name, start, total)

    def due(step_done: int) -> bool:
        if step_done == total:
            return True
        if recipe.save_steps:
            return step_done % recipe.save_steps == 0
        return step_done % steps_per_epoch == 0

    peft_model.train()
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    micro_size = recipe.micro_batch_size or (1 if device.type == "cpu" else recipe.batch_size)
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not progress,
               dynamic_ncols=True)
    last_ckpt_step = start
    t_session = time.perf_counter()
    seconds_at_start = seconds
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        idx = epoch_order(n, recipe.seed, epoch)[k * recipe.batch_size:(k + 1) * recipe.batch_size]
        lr = lr_at(step, total, recipe)
        for g in optimizer.param_groups:
            g["lr"] = lr
        denom = float(n_labels[idx].sum())
        loss_total, step_tokens = 0.0, 0
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(recipe.seed * 1_000_003 + step)  # dropout of this step only
            micro_batches = plan_batches(lengths[idx], recipe.micro_batch_tokens, micro_size)
            for micro in micro_batches:
                batch = collate([seqs[idx[j]] for j in micro], device, pad_id)
                with autocast:
                    loss = label_loss_sum(peft_model, batch) / denom
                loss.backward()
                loss_total += float(loss.detach())
                step_tokens += int(lengths[idx[micro]].sum())
        grads = [p for p in params.values() if p.grad is not None]
        if recipe.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, recipe.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in grads])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += step_tokens
        seconds = seconds_at_start + time.perf_counter() - t_session
        rec = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": loss_total,
               "lr": lr, "tokens": step_tokens, "label_tokens": int(denom), "grad_norm": grad_norm}
        history.append(rec)
        bar.set_postfix(loss=f"{loss_total:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
        bar.update(1)
        if due(step + 1):
            seg = history[last_ckpt_step:]
            state = {"step": step + 1, "epoch": rec["epoch"],
                     "learning_rate": float(np.mean([h["lr"] for h in seg])),
                     "last_learning_rate": lr, "loss": float(np.mean([h["loss"] for h in seg])),
                     "tokens": tokens, "seconds": round(seconds, 3), "total_steps": total, "key": key,
                     "history": history}
            dest = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step + 1:06d}"
            _save_checkpoint(dest, peft_model, optimizer, names, base_path, state)
            last_ckpt_step = step + 1
        if on_step is not None:
            on_step(step + 1, rec)
    bar.close()

    last = list_checkpoints(out)[-1]

    def write_final(tmp: Path) -> None:
        for f in ADAPTER_FILES:
            shutil.copy2(last.path / f, tmp / f)

    _atomic_dir(out / "final", write_final)
    result = TrainResult(out_dir=out, final=out / "final", checkpoints=tuple(list_checkpoints(out)),
                         history=tuple(history), seconds=seconds, tokens=tokens,
                         label_tokens=int(sum(h["label_tokens"] for h in history)), recipe=recipe,
                         base=str(base_path), n_examples=n)
    write_json(done_file, {"key": key, **result.to_dict(), "device": str(device),
                           "autocast_dtype": str(amp_dtype).replace("torch.", "")})
    return result


# --------------------------------------------------------------------------------------------
# Warmup on a pool file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupResult:
    """The warmed model (``final``) and how it was made (``OUT/warmup.json``)."""

    train: TrainResult
    subset_ids: tuple[str, ...]
    subset_indices: tuple[int, ...]
    fraction: float
    seed: int
    pool_records: int

    @property
    def final(self) -> Path:
        return self.train.final

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "pool_records": self.pool_records,
                "subset": {"n": len(self.subset_ids), "ids": list(self.subset_ids),
                           "indices": list(self.subset_indices)},
                **self.train.to_dict()}


def draw_subset(n_records: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random ``round(fraction * n)`` share (at least 1) of ``n`` records."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n_records < 1:
        raise ValueError("the pool holds no valid record")
    k = max(1, parse_budget(float(fraction), n_records))
    return np.sort(np.random.default_rng(seed).choice(n_records, size=k, replace=False))


def warmup_key(pool: str | Path, model: str | os.PathLike, fraction: float, seed: int, recipe: LoraRecipe,
               format: str | None = None, skip_invalid: bool = False) -> str:
    """Identity of a warmup: pool file, base model folder, subset and recipe."""
    base = str(resolve_model_path(model).resolve())
    return config_hash(recipe.key_fields(), {"pool": file_identity(pool), "base": base, "fraction": fraction,
                                             "seed": seed, "format": format, "skip_invalid": skip_invalid})


def load_warmup(out_dir: str | Path) -> WarmupResult:
    """Read a finished warmup folder."""
    out = Path(out_dir)
    d = json.loads((out / "warmup.json").read_text())
    return WarmupResult(TrainResult.from_dict(out, d, cached=True), tuple(d["subset"]["ids"]),
                        tuple(d["subset"]["indices"]), float(d["fraction"]), int(d["seed"]),
                        int(d["pool_records"]))


def warmup(
    pool_path: str | Path,
    out_dir: str | Path,
    model: str | os.PathLike = "default",
    fraction: float = 0.05,
    seed: int = 0,
    recipe: LoraRecipe = LoraRecipe(),
    *,
    format: str | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> WarmupResult:
    """Warmup of SPEC.md: LoRA-fine-tune ``model`` on a seeded random ``fraction`` of the pool.

    ``seed`` draws the subset (``numpy.random.default_rng(seed)``); ``recipe.seed`` drives data order,
    LoRA init and dropout (the CLI sets both from ``--seed``). A finished warmup with the same
    settings in ``out_dir`` is returned without loading the model; an interrupted one resumes.
    """
    out = Path(out_dir)
    key = warmup_key(pool_path, model, fraction, seed, recipe, format, skip_invalid)
    done = out / "warmup.json"
    if done.exists() and (out / "final").is_dir():
        prev = json.loads(done.read_text())
        if prev.get("key") == key:
            return load_warmup(out)
        if not overwrite:
            raise RuntimeError(f"{out} holds a warmup with different settings (pool, model, fraction, seed "
                               "or recipe); rerun with --overwrite to redo it or choose another --out")
    n_records = sum(1 for _ in read_records(pool_path, format, skip_invalid=skip_invalid))
    chosen = draw_subset(n_records, fraction, seed)
    wanted = set(chosen.tolist())
    subset = [r for pos, r in enumerate(read_records(pool_path, format, skip_invalid=skip_invalid))
              if pos in wanted]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "subset.json", {"ids": [r.id for r in subset], "indices": [r.index for r in subset]})
    t0 = time.perf_counter()
    train = train_lora(model, subset, out, recipe, progress=progress, overwrite=overwrite,
                       trust_remote_code=trust_remote_code, on_step=on_step)
    result = WarmupResult(train, tuple(r.id for r in subset), tuple(r.index for r in subset), fraction, seed,
                          n_records)
    write_json(done, {"key": key, "pool": file_identity(pool_path),
                      "wall_s": round(time.perf_counter() - t0, 3), **result.to_dict()})
    return result


# --------------------------------------------------------------------------------------------
# The pipeline: warmup -> Stage I -> Stage II -> selection
# --------------------------------------------------------------------------------------------


def choose_checkpoints(warm_dir: str | Path, which: str) -> list[Checkpoint]:
    """``last`` (default; Table 8), ``all``, or a comma list of ``step-000004`` / ``4`` names."""
    ckpts = list_checkpoints(warm_dir)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints in {Path(warm_dir) / 'checkpoints'}")
    which = which.strip()
    if which == "last":
        return [ckpts[-1]]
    if which == "all":
        return ckpts
    by_step = {c.step: c for c in ckpts}
    chosen = []
    for part in (p.strip() for p in which.split(",") if p.strip()):
        digits = part[len(CHECKPOINT_PREFIX):] if part.startswith(CHECKPOINT_PREFIX) else part
        if not digits.isdigit() or int(digits) not in by_step:
            raise ValueError(f"--checkpoints: no checkpoint {part!r}; have "
                             + ", ".join(c.name for c in ckpts) + " (or 'last', 'all')")
        chosen.append(by_step[int(digits)])
    if not chosen:
        raise ValueError("--checkpoints: give last, all, or checkpoint names")
    return sorted(set(chosen), key=lambda c: c.step)


def aggregate_scores(tables: Sequence[Any], weights: Sequence[float]) -> Any:
    """Weighted sum of per-checkpoint score tables (same rows). ``-inf`` stays ``-inf``.

    ``score``, ``mean``, ``max`` and ``coverage`` are combined linearly, so Eq. 15 still holds per row;
    token counts come from the first table (they do not depend on the checkpoint).
    """
    import pyarrow as pa

    if len(tables) != len(weights) or not tables:
        raise ValueError("one weight per score table needed")
    base = tables[0]
    idx = base.column("index").to_numpy()
    cols: dict[str, Any] = {name: base.column(name) for name in base.column_names}
    for col in ("score", "mean", "max", "coverage"):
        acc = np.zeros(base.num_rows, dtype=np.float64)
        ninf = np.zeros(base.num_rows, dtype=bool)
        for t, w in zip(tables, weights, strict=True):
            if not np.array_equal(t.column("index").to_numpy(), idx):
                raise ValueError("score tables of different checkpoints cover different rows")
            v = t.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            ninf |= np.isneginf(v)
            acc += w * np.where(np.isfinite(v), v, 0.0)
        cols[col] = pa.array(np.where(ninf, -np.inf, acc))
    return pa.table(cols)


@dataclass(frozen=True)
class PipelineConfig:
    """``trim-select run``: what the warmup and the checkpoint aggregation do."""

    use_warmup: bool = True
    fraction: float = 0.05  # gamma (SPEC "Warmup")
    seed: int = 0  # subset draw and training seed
    recipe: LoraRecipe = field(default_factory=LoraRecipe)
    checkpoints: str = "last"  # last | all | step-a,step-b (Table 8: last)


def _run_key(pool: str | Path, targets: str | Path, model_id: str, cfg: PipelineConfig, render: RenderConfig,
             fpc: FingerprintConfig, sc: ScoreConfig, rt: RuntimeConfig, ckpt_names: list[str],
             format: str | None, target_format: str | None, skip_invalid: bool) -> str:
    """Identity of one selection run: target *content*, pool, scoring model and settings (not the budget)."""
    t = Path(targets)
    digest = hashlib.sha256(t.read_bytes()).hexdigest() if t.is_file() else json.dumps(file_identity(t))
    return config_hash(render, fpc, sc, {
        "targets": digest, "pool": file_identity(pool), "model": model_id,
        "checkpoints": [cfg.checkpoints, *ckpt_names], "chunk": rt.chunk_size, "dtype": rt.dtype,
        "format": format, "target_format": target_format, "skip_invalid": skip_invalid})


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def run_pipeline(
    pool: str | Path,
    targets: str | Path,
    out_dir: str | Path,
    budget: str | int | float,
    *,
    model: str = "default",
    pipeline: PipelineConfig | None = None,
    render: RenderConfig | None = None,
    fingerprint: FingerprintConfig | None = None,
    scoring: ScoreConfig | None = None,
    runtime: RuntimeConfig | None = None,
    format: str | None = None,
    target_format: str | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Algorithm 3 of the paper with every stage cached in ``out_dir``::

        OUT/warmup/                 train_lora/warmup output (skipped when complete, same settings)
        OUT/runs/<key>/             one folder per target set + selection settings (budget excluded):
                                    fingerprints, parts/, scores.parquet, coreset.jsonl, run.json;
                                    with several checkpoints, ckpt/step-NNNNNN/ holds each one's scores
        OUT/run.json, coreset.jsonl, scores.parquet   copies of the latest run's outputs

    A rerun with new targets or budget reuses the warmup (and, same targets, the scores); a crashed
    run resumes (warmup from its last checkpoint, Stage II from its finished chunks). Stage II runs
    on ``engine`` (:func:`trim_select.distributed.run`: ``local`` with ``workers``, or ``ray`` at
    ``ray_address``); the engine does not change the scores, so it is not part of the run key.
    """
    from .distributed import run as run_on_engine
    from .selector import TrimSelector

    pipeline = pipeline or PipelineConfig()
    render, fingerprint = render or RenderConfig(), fingerprint or FingerprintConfig()
    scoring, runtime = scoring or ScoreConfig(), runtime or RuntimeConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parse_budget(budget, 10**15)  # fail fast on a malformed budget, before any training
    t0 = time.perf_counter()
    warm: WarmupResult | None = None
    if pipeline.use_warmup:
        recipe = replace(pipeline.recipe, device=pipeline.recipe.device if pipeline.recipe.device != "auto"
                         else runtime.device)
        warm = warmup(pool, out / "warmup", model, pipeline.fraction, pipeline.seed, recipe, format=format,
                      skip_invalid=skip_invalid, progress=progress, overwrite=overwrite,
                      trust_remote_code=runtime.trust_remote_code)
        ckpts = choose_checkpoints(out / "warmup", pipeline.checkpoints)
        weights = checkpoint_weights(ckpts) if len(ckpts) > 1 else np.ones(1)
        last_only = pipeline.checkpoints == "last"
        models = [str(out / "warmup" / "final")] if last_only else [str(c.path) for c in ckpts]
        model_id = json.loads((out / "warmup" / "warmup.json").read_text())["key"]
        ckpt_names = [c.name for c in ckpts]
    else:
        if pipeline.checkpoints != "last":
            raise ValueError("--checkpoints needs a warmup (drop --no-warmup)")
        ckpts, weights, models = [], np.zeros(0), [model]
        model_id = str(resolve_model_path(model).resolve())
        ckpt_names = []
    t_warm = time.perf_counter() - t0
    key = _run_key(pool, targets, model_id, pipeline, render, fingerprint, scoring, runtime, ckpt_names,
                   format, target_format, skip_invalid)
    run_dir = out / "runs" / key
    run_dir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {
        "command": "run",
        "run_dir": str(run_dir),
        "pipeline": {"use_warmup": pipeline.use_warmup, "fraction": pipeline.fraction, "seed": pipeline.seed,
                     "checkpoints": pipeline.checkpoints, "targets": str(Path(targets).resolve())},
        "warmup": None if warm is None else {
            "dir": str(out / "warmup"), "cached": warm.train.cached, "subset_ids": list(warm.subset_ids),
            "subset_indices": list(warm.subset_indices), "recipe": to_dict(warm.train.recipe),
            "losses": warm.train.losses, "seconds": round(warm.train.seconds, 3), "tokens": warm.train.tokens,
            "tokens_per_s": round(warm.train.tokens_per_s, 2), "base": warm.train.base},
        "checkpoints": [dict(c.to_dict(), weight=float(w)) for c, w in zip(ckpts, weights, strict=True)],
    }

    def selector(spec: str) -> TrimSelector:
        return TrimSelector(spec, render=render, fingerprint=fingerprint, scoring=scoring, runtime=runtime,
                            progress=progress)

    if len(models) == 1:
        report = run_on_engine(selector(models[0]), pool, run_dir, budget, engine=engine, workers=workers,
                               ray_address=ray_address, targets=targets, format=format,
                               target_format=target_format, skip_invalid=skip_invalid, overwrite=overwrite,
                               extra=extra)
    else:
        tables = []
        for spec, ck in zip(models, ckpts, strict=True):
            sel = selector(spec)
            run_on_engine(sel, pool, run_dir / "ckpt" / ck.name, None, engine=engine, workers=workers,
                          ray_address=ray_address, targets=targets, format=format, target_format=target_format,
                          skip_invalid=skip_invalid, overwrite=overwrite)
            tables.append(_read_scores(run_dir / "ckpt" / ck.name))
        table = aggregate_scores(tables, weights.tolist())
        fp_src = run_dir / "ckpt" / ckpts[-1].name / "fingerprints.safetensors"
        _copy_atomic(fp_src, run_dir / "fingerprints.safetensors")
        report = sel.finalize(pool, run_dir, table, budget, format=format, extra=extra)
        report["timings_s"]["total"] = round(time.perf_counter() - t0 - t_warm, 3)
        write_json(run_dir / "run.json", report)
    report["timings_s"]["warmup_stage"] = round(t_warm, 3)
    report["timings_s"]["pipeline_total"] = round(time.perf_counter() - t0, 3)
    write_json(run_dir / "run.json", report)
    for name in ("coreset.jsonl", "scores.parquet", "fingerprints.safetensors", "run.json"):
        if (run_dir / name).exists():
            _copy_atomic(run_dir / name, out / name)
    return report


def _read_scores(d: Path) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(d / "scores.parquet")
