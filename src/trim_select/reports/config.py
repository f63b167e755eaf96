"""What a report draws (:class:`ReportConfig`) and the column names it reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import documented

log = logging.getLogger(__name__)

WHITESPACE = "whitespace"
N_TOKENS = "n_tokens"
TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class ReportConfig:
    """What ``build_report`` draws and where the token view gets its model and targets."""

    model: str | None = documented(None, "Model for the token view and tokenizer lengths (default: the one in "
                                         "run.json).")
    targets: str | Path | None = documented(None, "Target file: the token view shows its saliency α per token "
                                                  "(default: the targets recorded in run.json).")
    pool: str | Path | None = documented(None, "Pool file, when it moved since the runs (default: the path in "
                                               "run.json).")
    token_view: bool = documented(True, "Token view of targets and top/bottom candidates (loads the model).")
    n_examples: int = documented(3, "Top and bottom candidates in the token view.")
    n_targets: int = documented(10, "Target examples in the token view.")
    n_preview: int = documented(5, "Coreset rows per method in the preview table.")
    max_tokens: int = documented(768, "Tokens shown per example in the token view.")
    top_tasks: int = documented(10, "Tasks shown in the task-mix figure.")
    device: str = documented("auto", "auto|cpu|cuda|cuda:N (auto: cuda if available, else cpu).")
    dtype: str | None = documented(None, "Token-view dtype (default: the dtype recorded in run.json, else auto).")
    embed_figures: bool = True  # PNGs inlined as data URIs (the page is self-contained)
    title: str = documented("trim-select report", "Page title.")

    def __post_init__(self) -> None:
        if self.n_examples < 0 or self.n_targets < 0 or self.n_preview < 0 or self.max_tokens < 1:
            raise ValueError("n_examples, n_targets and n_preview must be >= 0 and max_tokens >= 1")
