"""Shared option parsing and error reporting for the CLI."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from functools import wraps
from typing import Any

import typer
from rich.console import Console

from ..config import SCOPES, FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig, exact_spec
from ..interrupts import stop_on_signals

console = Console(stderr=True)

# Defaults read once from the config dataclasses (written once there; the options: cli/options.py).
RENDER, RUNTIME = RenderConfig(), RuntimeConfig()
__all__ = ["RENDER", "RUNTIME", "build_configs", "check_scope", "console", "friendly_errors",
           "parse_penalty"]
_FIELDS = {cls: {f.name for f in fields(cls)} for cls in (RenderConfig, FingerprintConfig, ScoreConfig,
                                                          RuntimeConfig)}


def parse_penalty(value: str) -> float | None:
    if value.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"--penalty takes a number in (0, 1] or 'none', got {value!r}") from None


def check_scope(value: str) -> str:
    if value not in SCOPES:
        raise typer.BadParameter(f"--scope must be one of {', '.join(SCOPES)}")
    return value


def build_configs(**options: Any) -> tuple[RenderConfig, FingerprintConfig, ScoreConfig, RuntimeConfig]:
    """The four configs from CLI values: each option fills the dataclass field of its name; a field
    no option names keeps its dataclass default (so a command passes only the options it has).
    ``exact_spec=True`` (``--exact-spec``) gives the paper's configs (:func:`trim_select.config.exact_spec`)."""
    spec = options.pop("exact_spec", False)
    unknown = sorted(set(options) - set().union(*_FIELDS.values()))
    if unknown:
        raise TypeError(f"no config field named {unknown}")
    if "scope" in options:
        check_scope(options["scope"])
    if isinstance(options.get("penalty"), str):
        options["penalty"] = parse_penalty(options["penalty"])
    try:
        render, fpc, scoring, runtime = (cls(**{k: v for k, v in options.items() if k in names})
                                         for cls, names in _FIELDS.items())
        if spec:
            render, fpc, scoring = exact_spec(render, fpc, scoring)
        return render, fpc, scoring, runtime
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures (bad data, missing files, bad settings) into one clear line, exit 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with stop_on_signals():  # SIGINT/SIGTERM unwind like Ctrl-C: temp files removed, parts kept
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/]: finished chunks are kept; rerun the same command to resume")
                sys.exit(130)
            except (ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
                if os.environ.get("TRIM_SELECT_DEBUG"):
                    raise
                console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                sys.exit(2)

    return wrapper
