"""One entry point for LoRA SFT: the recipe names the trainer (``LoraRecipe.trainer``).

``trl`` (default): TRL ``SFTTrainer`` + peft (:mod:`.trl_sft`); ``native``: our step loop
(:mod:`.lora`). Both take the same records, write the same checkpoint layout
(:mod:`.checkpoints`), cache and resume the same way, and give the same losses and adapter to float
rounding on CPU (``tests/test_trl_training.py``); a folder trained by one is refused by the other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import Record
from ..models import LoadedModel
from .lora import TrainResult, train_lora
from .recipe import LoraRecipe
from .trl_sft import train_lora_trl


def fine_tune(model: str | os.PathLike | LoadedModel, records: Sequence[Record], out_dir: str | Path,
              recipe: LoraRecipe, **kwargs: Any) -> TrainResult:
    """LoRA-fine-tune ``model`` on ``records`` with ``recipe.trainer`` (keyword arguments as
    :func:`~trim_select.training.lora.train_lora`)."""
    fn = train_lora_trl if recipe.trainer == "trl" else train_lora
    return fn(model, records, out_dir, recipe, **kwargs)
