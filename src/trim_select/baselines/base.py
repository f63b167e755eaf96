"""What every baseline shares: its inputs, its result, the selection-cost counter and the registry.

A baseline is a function ``score(inputs, config, cost) -> BaselineScores`` registered under a
name with its frozen config class. :func:`trim_select.baselines.run_baseline` reads the inputs,
calls it, selects with :func:`trim_select.selection.select_top` (ties to the lower pool index) and
writes the same output layout as ``trim-select select``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RenderConfig, RuntimeConfig, documented
from ..data import Record
from ..progress import StageTimes


@dataclass(frozen=True)
class BaselineConfig:
    """Settings shared by every baseline (the method's own settings live in its config class)."""

    seed: int = documented(0, "random: the sample; dsir --dsir-resample: the Gumbel noise; less: projection and "
                              "fresh-LoRA init.")
    model: str = "default"  # 'default', a HF folder, or a warmup folder with checkpoints/
    checkpoints: str = documented("all", "rds/less with a warmup folder as --model: all|last|STEP,STEP "
                                         "(LR-weighted).")
    render: RenderConfig = RenderConfig()
    runtime: RuntimeConfig = RuntimeConfig()


@dataclass
class SelectionCost(StageTimes):
    """What the selection spent, reported in ``run.json`` beside wall time (stage seconds: ``timed``).

    A *pass* is one example through the model (a batch of 8 sequences counts 8 forward passes);
    ``tokens`` counts non-padding tokens that went through the model (forward; a backward pass
    re-visits the same tokens and is counted in ``backward_tokens``).
    """

    forward_passes: int = 0
    backward_passes: int = 0
    tokens: int = 0
    backward_tokens: int = 0
    text_tokens: int = 0  # lexical methods: words/terms processed (no model involved)
    model_loads: int = 0

    def forward(self, n_examples: int, n_tokens: int) -> None:
        self.forward_passes += int(n_examples)
        self.tokens += int(n_tokens)

    def backward(self, n_examples: int, n_tokens: int) -> None:
        self.backward_passes += int(n_examples)
        self.backward_tokens += int(n_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
                "tokens": self.tokens, "backward_tokens": self.backward_tokens,
                "text_tokens": self.text_tokens, "model_loads": self.model_loads,
                "stage_seconds": dict(self.seconds)}


@dataclass(frozen=True)
class BaselineInputs:
    """The validated pool and target records (pool order = ``Record.index`` order)."""

    pool: list[Record]
    targets: list[Record]
    base: BaselineConfig
    out_dir: Path
    progress: bool = True


@dataclass
class BaselineScores:
    """A method's output: one score per pool record (higher = better), extra columns, notes."""

    score: np.ndarray
    columns: dict[str, np.ndarray | list] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # method facts for run.json (resolved settings)
    model: dict[str, Any] | None = None  # model identity when a model was used


ScoreFn = Callable[[BaselineInputs, Any, SelectionCost], BaselineScores]


@dataclass(frozen=True)
class BaselineMethod:
    name: str
    config_cls: type
    fn: ScoreFn
    uses_model: bool
    summary: str


BASELINES: dict[str, BaselineMethod] = {}


def register(name: str, config_cls: type, *, uses_model: bool, summary: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: make ``fn`` available as ``trim-select baseline --method NAME``."""

    def deco(fn: ScoreFn) -> ScoreFn:
        BASELINES[name] = BaselineMethod(name, config_cls, fn, uses_model, summary)
        return fn

    return deco


def record_text(record: Record, sep: str = "\n") -> str:
    """All message contents of a record, in order (the text lexical baselines see)."""
    return sep.join(m.content for m in record.messages)
