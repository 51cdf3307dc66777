"""Learning-rate schedules: a linear warm-up, then constant or a cosine or linear decay to a floor."""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, warmup_steps: int, schedule: str, decay_steps: int | None, floor: float) -> float:
    """The factor on the peak learning rate at optimizer `step` (0-based): warm-up to 1 over `warmup_steps`, then
    `schedule` down to `floor` (min_lr / lr) at `decay_steps` (warm-up included), and `floor` after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if decay_steps is None:
        raise ValueError(f"trainer.lr_schedule={schedule!r} needs trainer.decay_steps (or a training job's planned steps)")
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1 - progress
    else:
        raise ValueError(f"unknown trainer.lr_schedule {schedule!r}")
    return floor + (1 - floor) * decay


def planned_optimizer_steps(*, batches_per_epoch: int, epochs: int, max_steps: int | None, grad_accum_every: int,
                            parts: int = 1) -> int:
    """Optimizer steps each part takes in a job (parts trained in turn, batch by batch, share the batches)."""
    total = batches_per_epoch * epochs // grad_accum_every
    if max_steps is not None:
        total = min(total, max_steps)
    return max(1, total // parts)
