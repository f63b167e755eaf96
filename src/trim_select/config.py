"""Configuration objects: frozen dataclasses, one per stage, serialisable to JSON.

The CLI only parses arguments into these; the library functions take them (or their fields).
Defaults are the paper's (docs/SPEC.md) unless a field's comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Scope = Literal["all", "prompt", "response"]
SCOPES: tuple[str, ...] = ("all", "prompt", "response")


WARMUP_FRACTION = 0.05  # gamma: share of the pool the warmup trains on (SPEC "Warmup"; Table 7)


@dataclass(frozen=True)
class RenderConfig:
    """How records become token sequences (``data`` module)."""

    format: str | None = None  # None: auto-detect per file
    max_length: int = 2048
    scope: Scope = "all"
    # Template scaffolding = rendered tokens that belong to no message's content (role headers, a
    # default system prompt injected by the chat template). The exact spec scores them under scope
    # "all"; they are identical in every example, so their hidden states match the fingerprints
    # perfectly: the max term saturates at 1 for every example and the mean favours short
    # examples (README "Why plain TRIM picks short examples"). Our default scores message content
    # only; score_template=True reproduces the exact spec.
    score_template: bool = False
    chat_template: bool | None = None  # None: use the tokenizer's chat template when it has one

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclass(frozen=True)
class FingerprintConfig:
    """Stage I (Eq. 1-9)."""

    layers: int = 6  # L: last L layers (all if the model has fewer)
    row_weight: float = 0.5  # w_Q, Eq. 7
    col_weight: float = 0.5  # w_K, Eq. 7

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")


@dataclass(frozen=True)
class ScoreConfig:
    """Stage II (Eq. 10-15)."""

    penalty: float | None = 1.0  # lambda for unseen token classes; None: unseen tokens are not scored
    mean_weight: float = 0.5  # w_mu
    max_weight: float = 0.5  # w_m
    coverage_weight: float = 0.05  # eta
    idf: bool = False  # extension: IDF-weighted mean term (off in the paper)

    def __post_init__(self) -> None:
        if self.penalty is not None and not 0.0 < self.penalty <= 1.0:
            raise ValueError(f"penalty must be in (0, 1] or None, got {self.penalty}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast forward passes run. Never changes results beyond float rounding."""

    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 on GPUs/CPUs that support it, else float32
    batch_tokens: int = 16384  # padded tokens per forward batch
    max_batch_size: int = 256
    chunk_size: int = 2048  # sequences per scoring chunk (unit of resume and of sorting)
    compile: bool = False  # torch.compile the base model
    trust_remote_code: bool = False
    # Stage II forward without the padding mask where exact (right padding, plain causal full
    # attention: batching.padding_mask_free); False always passes the mask. Same hidden states.
    mask_free: bool = True
    tokenizer_workers: int = 0  # processes rendering + tokenising the pool; 0: in the calling process

    def __post_init__(self) -> None:
        if self.batch_tokens < 1 or self.max_batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_tokens, max_batch_size and chunk_size must be positive")
        if self.tokenizer_workers < 0:
            raise ValueError(f"tokenizer_workers must be >= 0, got {self.tokenizer_workers}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(obj)


def config_hash(*objs: Any) -> str:
    """Stable short hash of configs (used to refuse resuming with different settings)."""
    import hashlib

    payload = json.dumps([to_dict(o) if dataclasses.is_dataclass(o) else o for o in objs], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
