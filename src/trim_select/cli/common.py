"""Shared option parsing and error reporting for the CLI."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console

from ..config import SCOPES, FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig

console = Console(stderr=True)


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


def build_configs(
    *,
    format: str | None,
    scope: str,
    max_length: int,
    score_template: bool,
    layers: int,
    row_weight: float,
    col_weight: float,
    penalty: str,
    mean_weight: float,
    max_weight: float,
    coverage_weight: float,
    idf: bool,
    device: str,
    dtype: str,
    batch_tokens: int,
    chunk_size: int,
    trust_remote_code: bool,
) -> tuple[RenderConfig, FingerprintConfig, ScoreConfig, RuntimeConfig]:
    try:
        return (
            RenderConfig(format=format, max_length=max_length, scope=check_scope(scope),
                         score_template=score_template),
            FingerprintConfig(layers=layers, row_weight=row_weight, col_weight=col_weight),
            ScoreConfig(penalty=parse_penalty(penalty), mean_weight=mean_weight, max_weight=max_weight,
                        coverage_weight=coverage_weight, idf=idf),
            RuntimeConfig(device=device, dtype=dtype, batch_tokens=batch_tokens, chunk_size=chunk_size,
                          trust_remote_code=trust_remote_code),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures (bad data, missing files, bad settings) into one clear line, exit 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        signal.signal(signal.SIGTERM, _terminate)
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


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed and finished chunks are kept."""
    raise KeyboardInterrupt
