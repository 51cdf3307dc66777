"""DPM-Solver++(2M) (Lu et al. 2022): the probability-flow ODE of a diffusion solved in log-SNR time from the model's
x0 predictions, second order from the previous step's prediction (multistep: one network call a step).

Working on x0 (the *data* prediction, "++") is what keeps it stable under classifier-free guidance and thresholding:
both act on x0 before the solver sees it. With lambda = log(alpha / sigma), alpha = sqrt(abar), sigma = sqrt(1 - abar),
one step from t to s (h = lambda_s - lambda_t) is

    x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D,    D = x0_t                             (first order)
                                                               D = (1 + 1/2r) x0_t - (1/2r) x0_prev  (r = h_prev / h)

and the last step, to the clean level, returns the x0 prediction, as DDIM's does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

PredictX0 = Callable[[Tensor, int], Tensor]  # (x_t, t) -> the model's (guided, transformed) x0 prediction


def log_snr(alphas_cumprod: Tensor, t: int) -> Tensor:
    """lambda_t = log(alpha_t / sigma_t) of discrete level t."""
    abar = alphas_cumprod[t].double()
    return 0.5 * (torch.log(abar) - torch.log1p(-abar))


def dpmpp_2m(predict_x0: PredictX0, x: Tensor, pairs: list[tuple[int, int]], alphas_cumprod: Tensor) -> Tensor:
    """Solve from noise `x` at the first level of `pairs` ((t, t_prev) from high to low; t_prev = -1: clean)."""
    previous: Optional[tuple[Tensor, Tensor]] = None  # (x0 prediction, h) of the step before
    for t, t_prev in pairs:
        x0 = predict_x0(x, t)
        if t_prev < 0:
            return x0
        h = log_snr(alphas_cumprod, t_prev) - log_snr(alphas_cumprod, t)
        data = x0
        if previous is not None:
            ratio = previous[1] / h
            data = (1 + 1 / (2 * ratio)) * x0 - (1 / (2 * ratio)) * previous[0]
        sigma_t, sigma_s = (1 - alphas_cumprod[t]).sqrt(), (1 - alphas_cumprod[t_prev]).sqrt()
        alpha_s = alphas_cumprod[t_prev].sqrt()
        x = (sigma_s / sigma_t).to(x.dtype) * x - (alpha_s * torch.expm1(-h)).to(x.dtype) * data
        previous = (x0, h)
    return x
