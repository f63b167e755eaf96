"""What a report draws (:class:`ReportConfig`) and the column names it reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WHITESPACE = "whitespace"
N_TOKENS = "n_tokens"
TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class ReportConfig:
    """What ``build_report`` draws and where the token view gets its model and targets."""

    model: str | None = None  # token view / tokenizer; None: the model recorded in run.json
    targets: str | Path | None = None  # target file for the saliency view; None: run.json "targets"
    pool: str | Path | None = None  # override the pool path recorded in run.json
    token_view: bool = True
    n_examples: int = 3  # top and bottom candidates in the token view
    n_targets: int = 10  # target examples in the token view
    n_preview: int = 5  # coreset rows per method in the preview table
    max_tokens: int = 768  # tokens shown per example in the token view
    top_tasks: int = 10
    device: str = "auto"
    dtype: str | None = None  # None: the dtype recorded in run.json (else auto)
    embed_figures: bool = True  # PNGs inlined as data URIs (the page is self-contained)
    title: str = "trim-select report"

    def __post_init__(self) -> None:
        if self.n_examples < 0 or self.n_targets < 0 or self.n_preview < 0 or self.max_tokens < 1:
            raise ValueError("n_examples, n_targets and n_preview must be >= 0 and max_tokens >= 1")
