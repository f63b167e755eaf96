"""The LoRA fine-tuning recipe every trainer of the project follows (paper Table 7; ``docs/SPEC.md``
"Warmup"), and its learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config import documented, to_dict

TRAINERS: tuple[str, ...] = ("trl", "native")


@dataclass(frozen=True)
class LoraRecipe:
    """LoRA SFT hyperparameters; defaults are the paper's Table 7 (shared with LESS).

    ``batch_size`` is the effective batch (examples per optimizer step); each step's examples are
    split into micro-batches of at most ``micro_batch_tokens`` padded tokens (Table 7: 2 x 2048 per
    device, accumulated 32 times), and the loss is the mean over all response tokens of the step,
    so the split never changes the update beyond float rounding.
    """

    lr: float = documented(2e-5, "AdamW learning rate (Table 7).")
    schedule: str = documented("linear", "linear|constant after the LR warmup (Table 7: linear decay).")
    warmup_ratio: float = documented(0.03, "Share of optimizer steps with linear LR warmup (Table 7).")
    epochs: int = documented(4, "Warmup epochs (Table 7).")
    batch_size: int = documented(64, "Effective batch in examples (Table 7: 2 x 32 accumulation).")
    micro_batch_tokens: int = documented(4096, "Padded tokens per forward/backward (memory; not the math; "
                                               "Table 7: 2 x 2048).")
    # 0 = auto: 1 on CPU -- no padding, so SDPA drops the mask and takes its flash kernel (SmolLM2 on a
    # 2-core CPU: 4x faster in bf16, 3-5x less memory than padded micro-batches) -- and only the token
    # budget on GPUs
    micro_batch_size: int = documented(0, "Max sequences per micro-batch; 0: auto (1 on CPU: no padding mask, "
                                          "faster and leaner; token budget only on GPU).")
    max_length: int = documented(2048, "Truncate training sequences; longer examples keep their end, the "
                                       "response (Table 7).")
    lora_r: int = documented(128, "LoRA rank (Table 7).")
    lora_alpha: int = documented(512, "LoRA alpha (Table 7).")
    lora_dropout: float = documented(0.1, "LoRA dropout (Table 7).")
    target_modules: tuple[str, ...] = documented(("q_proj", "k_proj", "v_proj", "o_proj"),
                                                 "Module names to adapt, a comma list (Table 7).")
    weight_decay: float = documented(0.0, "AdamW weight decay (HF Trainer default; LESS sets none).")
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # HF Trainer default; 0 disables clipping
    train_eos: bool = True  # also learn the end-of-turn token after each assistant turn (open-instruct)
    seed: int = documented(0, "Seed of the data order, LoRA init and dropout.")
    dtype: str = documented("auto", "auto (bf16 autocast on GPUs that support it, float32 on CPU)|float32|bf16 "
                                    "(autocast; weights stay float32).")
    device: str = documented("auto", "auto|cpu|cuda|cuda:N (auto: cuda if available, else cpu).")
    save_steps: int = documented(0, "Checkpoint every N optimizer steps (0: at the end of every epoch).")
    gradient_checkpointing: bool = documented(False, "Recompute activations (memory for compute; large models).")
    trainer: str = documented("trl", "trl (TRL SFTTrainer + peft, training/trl_sft.py)|native (our loop, "
                                     "training/lora.py; same losses to float rounding on CPU).")

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.micro_batch_tokens < 1:
            raise ValueError("lr, epochs, batch_size and micro_batch_tokens must be positive")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"schedule must be 'linear' or 'constant', got {self.schedule!r}")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_r >= 1, lora_alpha > 0 and lora_dropout in [0, 1) required")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if self.micro_batch_size < 0:
            raise ValueError(f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {self.trainer!r}")
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be >= 0, got {self.save_steps}")
        if isinstance(self.target_modules, list):  # tolerate lists from JSON
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraRecipe:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "target_modules" else v) for k, v in d.items() if k in names})

    def key_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (runtime-only fields left out)."""
        d = to_dict(self)
        for k in ("device", "micro_batch_tokens", "micro_batch_size", "gradient_checkpointing"):
            d.pop(k)
        return d


def lr_at(step: int, total_steps: int, recipe: LoraRecipe) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    The HF ``get_linear_schedule_with_warmup`` schedule that LESS and the paper train with:
    ``W = ceil(warmup_ratio * T)`` warmup steps rising linearly from 0, then linear decay to 0.
    """
    warm = math.ceil(total_steps * recipe.warmup_ratio)
    if step < warm:
        return recipe.lr * step / max(1, warm)
    if recipe.schedule == "constant":
        return recipe.lr
    return recipe.lr * max(0.0, (total_steps - step) / max(1, total_steps - warm))


