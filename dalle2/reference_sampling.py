"""DALLE2-pytorch's own DDIM loops (`sampler: reference`), so imported models sample with fewer steps as they did there.

Theirs differ from DDIM as `diffusion.GaussianDiffusion` runs it (Song et al.), and from each other:
- the prior steps through int(linspace(-1, T, steps + 1)) and takes each step's abar from the step before
  (alphas_cumprod_prev), while its x0 -> eps conversion uses the step's own; its last step returns x0;
- the decoder steps through int(linspace(0, T, steps + 2)) and ends at step 0, not at x0 (the last update is
  x0 * sqrt(abar_0) + sqrt(1 - abar_0) * eps).
Both draw noise for every step but their last one whatever eta is, and their DDIM ignores a learned variance. The math
is theirs; the code is ours, and tests/test_dalle2_pytorch_parity.py checks it against their outputs.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from .diffusion import GaussianDiffusion, ModelFn, X0Transform


def prior_times(timesteps: int, steps: int) -> list[tuple[int, int]]:
    """Their prior's (t, t_next) pairs; t_next = -1 ends at x0."""
    times = torch.linspace(-1.0, timesteps, steps=steps + 1)[:-1].int().tolist()[::-1]
    return list(zip(times[:-1], times[1:]))


def decoder_times(timesteps: int, steps: int) -> list[tuple[int, int]]:
    """Their decoder's (t, t_next) pairs, ending at step 0."""
    times = torch.linspace(0.0, timesteps, steps=steps + 2)[:-1].int().tolist()[::-1]
    return [(t, t_next) for t, t_next in zip(times[:-1], times[1:]) if t > t_next]


def reference_ddim(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: tuple[int, ...], *, kind: str, steps: int,
                   eta: float, device: torch.device | str = "cpu", x0_transform: Optional[X0Transform] = None,
                   noise: Optional[Tensor] = None, step_noise: Optional[Iterator[Tensor]] = None,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample with their `kind` ("prior" or "decoder") DDIM loop over `steps` steps; `noise` is x_T and `step_noise`
    the noise of each step after it, in their order, as in `GaussianDiffusion.sample`."""
    if kind not in ("prior", "decoder"):
        raise ValueError(f"kind must be 'prior' or 'decoder', got {kind!r}")
    x = torch.randn(shape, device=device, generator=generator) if noise is None else noise.to(device)
    # the prior indexes abar one step back (theirs: alphas_cumprod_prev); the decoder at the step itself
    alphas = diffusion.alphas_cumprod_prev if kind == "prior" else diffusion.alphas_cumprod
    pairs = prior_times(diffusion.timesteps, steps) if kind == "prior" else decoder_times(diffusion.timesteps, steps)
    for t, t_next in pairs:
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, _ = diffusion._predict(model_fn, x, t_batch, x0_transform)  # a learned variance is read off and unused
        eps = diffusion.eps_from_x0(x, t_batch, x0)
        if t_next < 0:  # the prior's last step
            x = x0
            continue
        alpha, alpha_next = alphas[t], alphas[t_next]
        c1 = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
        c2 = ((1 - alpha_next) - c1**2).sqrt()
        last = t_next == 0 if kind == "decoder" else t_next <= 0
        step = 0.0 if last else diffusion.step_noise(x, generator, step_noise)
        x = x0 * alpha_next.sqrt() + c1 * step + c2 * eps
    return x
