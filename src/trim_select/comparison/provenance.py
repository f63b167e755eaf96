"""Where a comparison ran: machine, commit and what ``auto`` resolved to (recorded in ``compare.json``)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from ..config import RuntimeConfig
from ..evaluation.harness import EvalConfig


def machine() -> str:
    """The CPU model, core count and Python version, recorded with every result."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def precision(recipe: Any, config: EvalConfig, runtime: RuntimeConfig) -> dict[str, str]:
    """What ``auto`` resolves to on this machine: the selection, fine-tuning autocast and inference dtypes
    and devices (``auto`` is bf16 on a CPU with AVX512-BF16 and float32 on one without, so the recorded
    settings alone do not say how a result was computed)."""
    from ..models import resolve_device, resolve_dtype, resolve_train_dtype

    train_dev, eval_dev, sel_dev = (resolve_device(x) for x in (recipe.device, config.device, runtime.device))
    return {"train_device": train_dev.type, "train_dtype": str(resolve_train_dtype(recipe.dtype, train_dev)),
            "eval_device": eval_dev.type, "eval_dtype": str(resolve_dtype(config.dtype, eval_dev)),
            "select_device": sel_dev.type, "select_dtype": str(resolve_dtype(runtime.dtype, sel_dev))}


def git_sha() -> str | None:
    """The short commit of the running code, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
