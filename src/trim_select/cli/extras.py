"""Registers the command modules of later stages (warmup/run, baselines, evaluation, reports,
scale-out) that exist in this installation."""

from __future__ import annotations

import importlib

for _name in ("pipeline", "baseline", "evaluate", "report", "distributed"):
    try:
        importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as exc:  # a command module not part of this build
        if exc.name != f"{__package__}.{_name}":
            raise
