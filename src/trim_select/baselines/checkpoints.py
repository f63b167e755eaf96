"""Warmup checkpoints for the checkpoint-aggregating baselines (RDS, LESS).

Contract (written by ``trim-select warmup``)::

    WARMUP_DIR/checkpoints/step-XXXXXX/
        adapter_model.safetensors, adapter_config.json   (peft LoRA adapter)
        trim_select_base.json                            {"base": <model spec>}
        state.json                                       {"step", "epoch", "learning_rate", "loss", "tokens"}
        optimizer.safetensors                            AdamW exp_avg / exp_avg_sq per LoRA parameter

``--model`` may name the warmup folder (every checkpoint), one checkpoint folder, a bare LoRA
adapter folder (e.g. ``WARMUP_DIR/final``: one checkpoint without optimizer state, so LESS falls
back to plain gradients) or a plain model (no checkpoints: the baseline says so in ``run.json``).
Checkpoint weights follow LESS (``matching.py``): each checkpoint's learning rate (the warmup
writes the mean rate of the steps since the previous checkpoint), renormalised to sum to 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    learning_rate: float
    state: dict[str, Any]

    @property
    def base(self) -> str:
        """The base model spec the adapter was trained on."""
        marker = self.path / "trim_select_base.json"
        if marker.exists():
            return str(json.loads(marker.read_text())["base"])
        cfg = json.loads((self.path / "adapter_config.json").read_text())
        return str(cfg.get("base_model_name_or_path") or "default")

    @property
    def optimizer_path(self) -> Path:
        return self.path / "optimizer.safetensors"

    def identity(self) -> dict[str, Any]:
        return {"path": str(self.path), "step": self.step, "learning_rate": self.learning_rate,
                **{k: self.state[k] for k in ("epoch", "loss", "tokens") if k in self.state}}


def _is_checkpoint(path: Path) -> bool:
    return (path / "adapter_config.json").exists() and (path / "state.json").exists()


def _load(path: Path) -> Checkpoint:
    state_file = path / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    m = _STEP.match(path.name)
    step = int(state.get("step", m.group(1) if m else 0))
    return Checkpoint(path=path, step=step, learning_rate=float(state.get("learning_rate", 0.0)), state=state)


def find_checkpoints(spec: str | Path | None) -> list[Checkpoint]:
    """Checkpoints of a warmup folder (sorted by step), ``[one]`` for a checkpoint folder, else ``[]``."""
    if spec is None or str(spec) == "default":
        return []
    path = Path(spec)
    if not path.is_dir():
        return []
    if (path / "adapter_config.json").exists():  # one checkpoint, or a bare adapter (no optimizer state)
        return [_load(path)]
    root = path / "checkpoints"
    if not root.is_dir():
        return []
    found = [_load(p) for p in root.iterdir() if p.is_dir() and _STEP.match(p.name) and _is_checkpoint(p)]
    if not found:
        raise FileNotFoundError(f"{root} holds no complete step-XXXXXX checkpoint "
                                "(adapter_config.json + state.json)")
    return sorted(found, key=lambda c: c.step)


def choose_checkpoints(found: list[Checkpoint], which: str) -> list[Checkpoint]:
    """``all`` | ``last`` | comma-separated steps (``100,200``)."""
    if not found:
        return []
    which = which.strip().lower()
    if which == "all":
        return list(found)
    if which == "last":
        return [found[-1]]
    try:
        steps = [int(s) for s in which.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--checkpoints takes all, last or comma-separated steps, got {which!r}") from None
    by_step = {c.step: c for c in found}
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise ValueError(f"no checkpoint for steps {missing}; available: {sorted(by_step)}")
    return [by_step[s] for s in steps]


def checkpoint_weights(chosen: list[Checkpoint]) -> np.ndarray:
    """Learning-rate weights renormalised to sum to 1 (LESS); uniform when every rate is 0."""
    lr = np.array([max(c.learning_rate, 0.0) for c in chosen], dtype=np.float64)
    if len(lr) == 0:
        return lr
    if lr.sum() <= 0:
        return np.full(len(lr), 1.0 / len(lr))
    return lr / lr.sum()
