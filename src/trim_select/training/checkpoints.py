"""The one checkpoint contract: what :func:`~trim_select.training.lora.train_lora` writes and what the
warmup pipeline (TRIM, paper Table 8 / Appendix G (ii)) and the checkpoint-aggregating baselines
(RDS, LESS) read. ``docs/SPEC.md`` "Warmup" describes the layout::

    OUT/train_manifest.json            settings key (refuses to resume with other settings)
    OUT/checkpoints/step-000002/       adapter_model.safetensors, adapter_config.json (peft),
                                       trim_select_base.json {"base": <base model folder>},
                                       state.json {"step","epoch","learning_rate","loss","tokens",...},
                                       optimizer.safetensors (AdamW exp_avg/<name>, exp_avg_sq/<name>,
                                       metadata adam_step)
    OUT/final/                         the adapter of the last checkpoint (usable as --model)
    OUT/train.json                     completion marker: losses, time, tokens/s, checkpoints

Choosing checkpoints: ``last`` | ``all`` | a comma list of ``step-000004`` / ``4`` names.
**The default is** :data:`DEFAULT_CHECKPOINTS` ``= "last"`` (paper Table 8: the last warmup
checkpoint scores best); ``trim-select run`` uses it. The LESS/RDS baselines override it with
``all`` in :class:`~trim_select.baselines.base.BaselineConfig` because LESS aggregates every
checkpoint by definition (Xia et al. 2024, ``matching.py``).

Weights follow LESS: each checkpoint's learning rate (the trainer records the mean rate of the
steps since the previous checkpoint) over their sum; equal weights when every rate is 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..models import adapter_base_spec

CHECKPOINT_PREFIX = "step-"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
BASE_MARKER = "trim_select_base.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", ADAPTER_CONFIG, BASE_MARKER)
DEFAULT_CHECKPOINTS = "last"  # Table 8; see the module docstring for the baselines' "all"
_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One saved training state (``OUT/checkpoints/step-NNNNNN``), or a bare adapter folder."""

    path: Path
    step: int  # optimizer steps done
    epoch: float  # epochs done (fractional mid-epoch)
    learning_rate: float  # mean lr of the steps since the previous checkpoint (LESS's weight)
    loss: float  # mean training loss of those steps
    tokens: int  # tokens processed so far (non-padding, forward + backward)
    state: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # state.json as read

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def base(self) -> str:
        """The base model spec the adapter was trained on (base marker, else peft's config)."""
        return str(adapter_base_spec(self.path) or "default")

    @property
    def optimizer_path(self) -> Path:
        return self.path / OPTIMIZER_FILE

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as the warmup and ``trim-select run`` report it."""
        return {"name": self.name, "path": str(self.path), "step": self.step, "epoch": self.epoch,
                "learning_rate": self.learning_rate, "loss": self.loss, "tokens": self.tokens}

    def identity(self) -> dict[str, Any]:
        """The checkpoint as the baselines report it (only the fields its ``state.json`` holds)."""
        return {"path": str(self.path), "step": self.step, "learning_rate": self.learning_rate,
                **{k: self.state[k] for k in ("epoch", "loss", "tokens") if k in self.state}}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint folder; a bare adapter without ``state.json`` has step (from its name or 0) and lr 0."""
    path = Path(path)
    state_file = path / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    m = _STEP.match(path.name)
    step = int(state.get("step", m.group(1) if m else 0))
    return Checkpoint(path, step, float(state.get("epoch", 0.0)), float(state.get("learning_rate", 0.0)),
                      float(state.get("loss", float("nan"))), int(state.get("tokens", 0)), state)


def is_complete(path: Path) -> bool:
    """A checkpoint folder with its adapter and state (folders are written atomically)."""
    return path.is_dir() and bool(_STEP.match(path.name)) and (path / STATE_FILE).exists() \
        and (path / ADAPTER_CONFIG).exists()


def list_checkpoints(out_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints of a training folder, by step (``[]`` when there are none)."""
    root = Path(out_dir) / "checkpoints"
    found = [read_checkpoint(p) for p in root.iterdir() if is_complete(p)] if root.is_dir() else []
    return sorted(found, key=lambda c: c.step)


def find_checkpoints(spec: str | Path | None) -> list[Checkpoint]:
    """What a ``--model`` value holds: every checkpoint of a warmup folder, ``[one]`` for a checkpoint
    or bare adapter folder (e.g. ``WARMUP_DIR/final``: no optimizer state), ``[]`` for a plain model."""
    if spec is None or str(spec) == "default":
        return []
    path = Path(spec)
    if not path.is_dir():
        return []
    if (path / ADAPTER_CONFIG).exists():
        return [read_checkpoint(path)]
    root = path / "checkpoints"
    if not root.is_dir():
        return []
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{root} holds no complete step-XXXXXX checkpoint "
                                "(adapter_config.json + state.json)")
    return found


def choose_checkpoints(found: str | Path | Sequence[Checkpoint],
                       which: str = DEFAULT_CHECKPOINTS) -> list[Checkpoint]:
    """``last`` (default; Table 8), ``all``, or a comma list of ``step-000004`` / ``4`` names, by step.

    ``found`` is a list of checkpoints (``[]`` gives ``[]``) or a training folder, which must hold one.
    """
    if isinstance(found, (str, Path)):
        ckpts = list_checkpoints(found)
        if not ckpts:
            raise FileNotFoundError(f"no checkpoints in {Path(found) / 'checkpoints'}")
    else:
        ckpts = list(found)
        if not ckpts:
            return []
    which = which.strip().lower()
    if which == "last":
        return [ckpts[-1]]
    if which == "all":
        return ckpts
    by_step = {c.step: c for c in ckpts}
    chosen = []
    for part in (p.strip() for p in which.split(",") if p.strip()):
        digits = part.removeprefix(CHECKPOINT_PREFIX)
        if not digits.isdigit() or int(digits) not in by_step:
            raise ValueError(f"--checkpoints: no checkpoint {part!r}; have "
                             + ", ".join(c.name for c in ckpts) + " (or 'last', 'all')")
        chosen.append(by_step[int(digits)])
    if not chosen:
        raise ValueError("--checkpoints: give last, all, or checkpoint names")
    return sorted(set(chosen), key=lambda c: c.step)


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
    flat = load_file(str(Path(checkpoint) / OPTIMIZER_FILE))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        kind, _, name = key.partition("/")
        if kind in ("exp_avg", "exp_avg_sq"):
            out.setdefault(name, {})[kind] = t
    return out


def optimizer_step(checkpoint: str | Path) -> int:
    """AdamW's step count stored with the moments (``adam_step``, else ``global_step``, else 0)."""
    with safe_open(str(Path(checkpoint) / OPTIMIZER_FILE), "pt") as fh:
        meta = fh.metadata() or {}
    return int(meta.get("adam_step", meta.get("global_step", 0)))


def atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
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


def adapter_key(param_name: str, adapter: str = "default") -> str:
    """Parameter name in the model -> name in ``adapter_model.safetensors`` (as peft saves it)."""
    return param_name.replace(f".{adapter}", "")


def checkpoint_state(history: list[dict[str, Any]], since: int, tokens: int, seconds: float, total: int,
                      key: str) -> dict[str, Any]:
    """``state.json`` of a checkpoint after ``history[-1]``; lr and loss are means since step ``since``."""
    seg, rec = history[since:], history[-1]
    return {"step": rec["step"], "epoch": rec["epoch"], "learning_rate": float(np.mean([h["lr"] for h in seg])),
            "last_learning_rate": rec["lr"], "loss": float(np.mean([h["loss"] for h in seg])),
            "tokens": tokens, "seconds": round(seconds, 3), "total_steps": total, "key": key,
            "history": history}


def save_checkpoint(dest: Path, peft_model: Any, optimizer: torch.optim.Optimizer, names: dict[int, str],
                    base: Path, state: dict[str, Any]) -> None:
    """Write one checkpoint folder atomically: adapter, base marker, AdamW moments, ``state.json``."""

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

    atomic_dir(dest, write)


def restore_checkpoint(ckpt: Checkpoint, peft_model: Any, optimizer: torch.optim.Optimizer,
                       params: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Load ``ckpt``'s adapter into ``peft_model`` (checked exactly) and its AdamW moments into
    ``optimizer`` (``params``: adapter name -> parameter); returns its ``state.json``."""
    from peft import set_peft_model_state_dict

    weights = load_file(str(ckpt.path / ADAPTER_FILES[0]))
    set_peft_model_state_dict(peft_model, weights)
    for name, p in params.items():  # exact: compare what was loaded
        if not torch.equal(p.detach().cpu(), weights[name].to(p.dtype)):
            raise RuntimeError(f"checkpoint {ckpt.path}: parameter {name} did not load")
    moments = load_optimizer_state(ckpt.path)
    adam_step = optimizer_step(ckpt.path)
    for name, p in params.items():
        if name in moments:
            optimizer.state[p] = {"step": torch.tensor(float(adam_step)),
                                  "exp_avg": moments[name]["exp_avg"].to(device, p.dtype),
                                  "exp_avg_sq": moments[name]["exp_avg_sq"].to(device, p.dtype)}
    return dict(ckpt.state)


def write_final(out_dir: Path, last: Checkpoint) -> Path:
    """Copy the adapter of ``last`` to ``OUT/final`` (atomic) and return that folder."""

    def write(tmp: Path) -> None:
        for f in ADAPTER_FILES:
            shutil.copy2(last.path / f, tmp / f)

    atomic_dir(out_dir / "final", write)
    return out_dir / "final"
