"""Configuration objects: frozen dataclasses, one per stage, serialisable to JSON.

The CLI only parses arguments into these; the library functions take them (or their fields).
Defaults are the paper's (docs/SPEC.md) unless a field's documentation says otherwise; each field's
default and documentation are written once, with :func:`documented` (the CLI's ``--help``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Scope = Literal["all", "prompt", "response"]
SCOPES: tuple[str, ...] = ("all", "prompt", "response")


WARMUP_FRACTION = 0.05  # gamma: share of the pool the warmup trains on (SPEC "Warmup"; Table 7)


def documented(default: Any, doc: str, *, extension: bool = False, off: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its default and its documentation, both written once: the CLI builds
    each option's ``--help`` from ``doc`` (``cli/options.py``). ``extension=True`` marks an option
    that is not in the paper and is off at ``default`` (docs/SPEC.md "Extensions"): :func:`config_hash`
    leaves it out while it is off, so results computed before it existed keep their keys (the
    computation with the extension off is the one they did). ``off``: the extension's paper value when
    the default switches it on (default: ``default``, i.e. off by default)."""
    meta = {"doc": doc, "extension": extension, "off": default if off is dataclasses.MISSING else off}
    return dataclasses.field(default=default, metadata=meta)


def extension_off(f: dataclasses.Field) -> Any:
    """The value at which extension field ``f`` is off (the paper's computation)."""
    return f.metadata.get("off", f.default)


def paper_off(config: Any) -> Any:
    """``config`` with every extension field at its off (paper) value."""
    return dataclasses.replace(config, **{f.name: extension_off(f) for f in dataclasses.fields(config)
                                          if f.metadata.get("extension")})


def field_doc(cls: type, name: str) -> str:
    """The documentation of field ``name`` of config dataclass ``cls`` (KeyError if it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata["doc"]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


@dataclass(frozen=True)
class RenderConfig:
    """How records become token sequences (``data`` module)."""

    format: str | None = documented(None, "messages|sharegpt|alpaca|prompt_response|text (default: auto-detect "
                                          "per file).")
    max_length: int = documented(2048, "Truncate sequences to this many tokens (scope-aware).")
    scope: Scope = documented("all", "Tokens that are fingerprinted and scored: all|prompt|response.")
    # Template scaffolding = rendered tokens that belong to no message's content (role headers, a
    # default system prompt injected by the chat template). The exact spec scores them under scope
    # "all"; they are identical in every example, so their hidden states match the fingerprints
    # perfectly: the max term saturates at 1 for every example and the mean favours short
    # examples (README "Why plain TRIM picks short examples"). Our default scores message content
    # only; score_template=True reproduces the exact spec.
    score_template: bool = documented(
        False, "With --scope all: --score-template also scores chat-template scaffolding (role headers, default "
               "system prompt) as the exact spec does; the default --content-only scores message content only.")
    chat_template: bool | None = documented(None, "Use the tokenizer's chat template (default: when it has one).")

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


DEFAULT_HIDDEN_FRACTION = 0.667  # layer 20 of SmolLM2-135M's 30: docs/SPEC.md "Extensions", README "Evidence"


@dataclass(frozen=True)
class FingerprintConfig:
    """Stage I (Eq. 1-9)."""

    layers: int = documented(6, "L: attention of the last L layers (Eq. 3, 5); all if the model has fewer.")
    row_weight: float = documented(0.5, "w_Q (Eq. 7).")
    col_weight: float = documented(0.5, "w_K (Eq. 7).")
    # Extension (docs/SPEC.md "Extensions"): the states of an intermediate layer instead of the last.
    hidden_layer: int | None = documented(
        None, "Extension: the hidden layer that fingerprints (Stage I) and pool states (Stage II) come from: N "
              "is the output of decoder layer N (hidden_states[N], 1 <= N < the model's layers); default: the "
              "last hidden state after the final norm, as in the paper.", extension=True)
    hidden_fraction: float | None = documented(
        DEFAULT_HIDDEN_FRACTION, "Extension (on by default, benchmarks/results/evidence): the hidden layer at "
                                 "this fraction of the model's depth, round(f x layers) (e.g. 0.667: "
              "layer 20 of SmolLM2-135M's 30, 12 of Gemma-3-270M's 18); the last hidden state when that is "
              "the last layer (1: always, as in the paper); --hidden-layer N overrides it.", extension=True, off=None)

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.hidden_layer is not None and self.hidden_layer < 1:
            raise ValueError(f"hidden_layer must be >= 1 (the output of decoder layer N) or unset, got "
                             f"{self.hidden_layer}")
        if self.hidden_fraction is not None and not 0.0 < self.hidden_fraction <= 1.0:
            raise ValueError(f"hidden_fraction must be in (0, 1] (1: the last hidden state) or unset, got "
                             f"{self.hidden_fraction}")

    def layer_for(self, n_layers: int | Callable[[], int]) -> int | None:
        """The hidden layer of an ``n_layers`` model: ``hidden_layer``, else ``round(hidden_fraction x
        n_layers)`` (at least 1; ``None``, the last hidden state, when that is the last layer), else ``None``.
        ``n_layers`` may be a callable, asked only when the fraction needs the depth (no model load)."""
        if self.hidden_layer is not None or self.hidden_fraction is None:
            return self.hidden_layer
        if callable(n_layers):
            n_layers = n_layers()
        n = max(1, round(self.hidden_fraction * n_layers))
        return n if n < n_layers else None


@dataclass(frozen=True)
class ScoreConfig:
    """Stage II (Eq. 10-15)."""

    penalty: float | None = documented(1.0, "lambda for unseen token classes (Eq. 12), or 'none': unseen "
                                            "tokens are not scored.")
    mean_weight: float = documented(0.5, "w_mu (Eq. 15).")
    max_weight: float = documented(0.5, "w_m (Eq. 15).")
    coverage_weight: float = documented(0.05, "eta (Eq. 15).")
    idf: bool = documented(False, "Extension: IDF-weighted mean term (off in the paper).")
    # Extension (docs/SPEC.md "Extensions"): subtract a target-independent ("hub") component.
    generic_rows: int = documented(
        0, "Extension: N > 0 builds fingerprints of a generic target set of N seeded random pool rows and "
           "scores each row by its score against the targets minus its score against the generic set; "
           "0: off (the paper).", extension=True)
    generic_seed: int = documented(0, "Extension: seed of the generic rows' draw (with --generic-rows).",
                                   extension=True)

    def __post_init__(self) -> None:
        if self.penalty is not None and not 0.0 < self.penalty <= 1.0:
            raise ValueError(f"penalty must be in (0, 1] or None, got {self.penalty}")
        if self.generic_rows < 0:
            raise ValueError(f"generic_rows must be >= 0, got {self.generic_rows}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast forward passes run. Never changes results beyond float rounding."""

    device: str = documented("auto", "auto|cpu|cuda|cuda:N (auto: cuda if available, else cpu).")
    dtype: str = documented("auto", "auto|float32|bfloat16|float16 (auto: bf16 on GPUs/CPUs that support it, "
                                    "else float32).")
    batch_tokens: int = documented(16384, "Padded tokens per forward batch (bounds memory).")
    max_batch_size: int = documented(256, "Sequences per forward batch at most.")
    chunk_size: int = documented(2048, "Examples per resumable scoring chunk (the unit of resume and of "
                                       "length sorting).")
    compile: bool = documented(False, "torch.compile the base model.")
    trust_remote_code: bool = documented(False, "Allow model code from the model folder.")
    # Stage II forward without the padding mask where exact (right padding, plain causal full
    # attention: batching.padding_mask_free); False always passes the mask. Same hidden states.
    mask_free: bool = documented(True, "Stage II forward without the padding mask where that is exact.")
    tokenizer_workers: int = documented(0, "Processes rendering and tokenising the pool; 0: in the calling "
                                           "process.")

    def __post_init__(self) -> None:
        if self.batch_tokens < 1 or self.max_batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_tokens, max_batch_size and chunk_size must be positive")
        if self.tokenizer_workers < 0:
            raise ValueError(f"tokenizer_workers must be >= 0, got {self.tokenizer_workers}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(obj)


def key_dict(obj: Any) -> dict[str, Any]:
    """The fields of a config dataclass that enter a cache key: all of them, except extensions
    (:func:`documented`) while they are off (at the paper's value)."""
    out = to_dict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get("extension") and out[f.name] == extension_off(f):
            del out[f.name]
    return out


def config_hash(*objs: Any) -> str:
    """Stable short hash of configs (used to refuse resuming with different settings)."""
    import hashlib

    payload = json.dumps([key_dict(o) if dataclasses.is_dataclass(o) else o for o in objs], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


EXACT_SPEC_DOC = ("Reproduce the paper exactly: chat-template scaffolding scored (--score-template), no "
                  "extension (--idf, --hidden-layer, --generic-rows refused).")


def exact_spec(render: RenderConfig, fingerprint: FingerprintConfig, scoring: ScoreConfig
               ) -> tuple[RenderConfig, FingerprintConfig, ScoreConfig]:
    """The configs of the paper's method (docs/SPEC.md; ``--exact-spec``): template tokens scored and
    every extension off. An extension the defaults switch on is switched off; one that was set to
    anything else is refused, never silently dropped."""
    on, off = [], {}
    for c in (fingerprint, scoring):
        for f in dataclasses.fields(c):
            value = getattr(c, f.name)
            if not f.metadata.get("extension") or value == extension_off(f):
                continue
            if value == f.default:
                off.setdefault(id(c), {})[f.name] = extension_off(f)
            else:
                on.append(f"{type(c).__name__}.{f.name}={value!r}")
    if scoring.idf:
        on.append("ScoreConfig.idf=True")
    if on:
        raise ValueError(f"--exact-spec reproduces the paper, which has no extensions: switch off {', '.join(on)}")
    fingerprint = dataclasses.replace(fingerprint, **off.get(id(fingerprint), {}))
    scoring = dataclasses.replace(scoring, **off.get(id(scoring), {}))
    return dataclasses.replace(render, score_template=True), fingerprint, scoring
