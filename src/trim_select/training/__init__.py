"""Training: the LoRA SFT trainer and its recipe (:mod:`.lora`) and the one checkpoint contract
(:mod:`.checkpoints`), shared by the warmup, the evaluation harness and the LESS/RDS baselines."""

from .checkpoints import Checkpoint, checkpoint_weights, choose_checkpoints, find_checkpoints, list_checkpoints
from .lora import LoraRecipe, TrainResult, train_lora

__all__ = ["Checkpoint", "LoraRecipe", "TrainResult", "checkpoint_weights", "choose_checkpoints",
           "find_checkpoints", "list_checkpoints", "train_lora"]
