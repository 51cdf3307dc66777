"""The trainers' optimisation settings: learning rate and its schedule, clipping, EMA, precision, accumulation."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from .configs import StrictModel


class TrainerConfig(StrictModel):
    """Optimisation settings shared by the prior and decoder trainers."""

    # one learning rate, or one per part the trainer optimises (the decoder: per unet, as DALLE2-pytorch's lr list)
    lr: Union[PositiveFloat, list[PositiveFloat]] = 3e-4
    weight_decay: NonNegativeFloat = 1e-2
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: NonNegativeInt = 0  # linear warm-up from lr / warmup_steps
    # after warm-up: constant, or a cosine or linear decay to min_lr at decay_steps (warm-up included; None: the
    # training job's planned optimizer steps)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr: Union[NonNegativeFloat, list[NonNegativeFloat]] = 0.0
    decay_steps: Optional[PositiveInt] = None
    # recompute activations in the backward pass (the unets' blocks, the prior's transformer layers): less memory,
    # about a third more compute, the same gradients
    gradient_checkpointing: bool = False
    max_grad_norm: Optional[PositiveFloat] = 1.0
    ema_beta: float = Field(default=0.99, ge=0, lt=1)
    ema_update_after_step: NonNegativeInt = 0
    ema_update_every: PositiveInt = 1
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_accum_every: PositiveInt = 1
    max_batch_size: Optional[PositiveInt] = None  # split larger batches into chunks of this size

    @model_validator(mode="after")
    def _check_lr(self) -> "TrainerConfig":
        parts = max(len(v) if isinstance(v, list) else 1 for v in (self.lr, self.min_lr))
        if any(m > lr for m, lr in zip(self.min_lr_of_parts(parts), self.lr_of_parts(parts))):
            raise ValueError(f"min_lr {self.min_lr} must not exceed lr {self.lr} (each part's)")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) must be greater than warmup_steps ({self.warmup_steps})")
        return self

    def lr_of_parts(self, parts: Optional[int]) -> list[float]:
        """One learning rate per part (`parts` of them; None: as given); a list of another length is an error."""
        return _per_part("lr", self.lr, parts)

    def min_lr_of_parts(self, parts: Optional[int]) -> list[float]:
        """One min_lr per part, as lr_of_parts."""
        return _per_part("min_lr", self.min_lr, parts)


def _per_part(name: str, value: Union[float, list[float]], parts: Optional[int]) -> list[float]:
    if not isinstance(value, list):
        return [value] * (parts or 1)
    if not value or (parts is not None and len(value) != parts):
        raise ValueError(f"trainer.{name} has {len(value)} values, one per trained part ({parts}) is needed")
    return list(value)
