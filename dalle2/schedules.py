"""Beta schedules, in float64 numpy: config validation checks them without importing torch (a Ray task that
only reads a config stays light); `diffusion.GaussianDiffusion` turns them into tensors."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def cosine_betas(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021)."""
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    alphas_cumprod = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clip(0, 0.999)


def linear_betas(timesteps: int) -> np.ndarray:
    """Betas of the linear schedule (Ho et al. 2020), rescaled so any step count spans the same noise."""
    scale = 1000 / timesteps
    # with 50 steps or fewer the rescaled end passes 1 (T=20: 1.0, T=10: 2.0): clamp as the cosine schedule does
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64).clip(max=0.999)


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {"cosine": cosine_betas, "linear": linear_betas}


def signal_left(beta_schedule: str, timesteps: int) -> float:
    """The fraction of the signal a schedule keeps at its last step (sampling starts from pure noise: ~0)."""
    return float(np.prod(1 - BETA_SCHEDULES[beta_schedule](timesteps)))
