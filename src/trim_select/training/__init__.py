"""Training: LoRA SFT through :func:`fine_tune` (TRL SFTTrainer in :mod:`.trl_sft`, or our loop in
:mod:`.lora` with the recipe), and the one checkpoint contract (:mod:`.checkpoints`), shared by the
warmup, the evaluation harness and the LESS/RDS baselines."""

from .checkpoints import Checkpoint, checkpoint_weights, choose_checkpoints, find_checkpoints, list_checkpoints
from .lora import TrainResult, train_lora
from .recipe import LoraRecipe
from .trainer import fine_tune

__all__ = ["Checkpoint", "LoraRecipe", "TrainResult", "checkpoint_weights", "choose_checkpoints",
           "fine_tune", "find_checkpoints", "list_checkpoints", "train_lora"]
