"""Gaussian diffusion math shared by the prior and the decoder.

Everything about noise lives here: beta schedules, the forward process (`q_sample`), conversions
between the eps / x0 / v parameterisations, the posterior, DDPM and DDIM steps, classifier-free
guidance, p2 loss weighting and RePaint inpainting. Networks never appear in this module: a model is
passed in as `model_fn(x_t, t) -> raw output` in the parameterisation named by `predict`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .row_random import RowRandom
from .schedules import BETA_SCHEDULES

Prediction = Literal["eps", "x0", "v"]
BetaSchedule = Literal["cosine", "linear"]
LossType = Literal["l1", "l2", "huber"]
ModelFn = Callable[[Tensor, Tensor], Tensor]
X0Transform = Callable[[Tensor], Tensor]
Sampler = Literal["ddim", "ddpm", "dpmpp"]




def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) of [-1, 1] data quantised to 256 levels under N(mean, e^(2 log_scale)), elementwise
    (the decoder's term at t = 0 of the variational bound, Ho et al. 2020)."""

    def cdf(z: Tensor) -> Tensor:  # a fast, accurate approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    centred, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centred + 1 / 255)), cdf(inv_std * (centred - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def dynamic_threshold(x0: Tensor, percentile: float = 0.95) -> Tensor:
    """Imagen's dynamic thresholding: per sample, s = the `percentile` quantile of |x0| (at least 1);
    clamp x0 to [-s, s] and divide by s, so saturated pixels are pulled in instead of clipped flat."""
    flat = x0.flatten(1).abs().float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0)
    s = s.reshape(-1, *((1,) * (x0.ndim - 1))).to(x0.dtype)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def extract(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Pick `values[t]` per sample and shape it to broadcast against `x`."""
    return values.gather(0, t).reshape(t.shape[0], *((1,) * (x.ndim - 1))).to(x.dtype)


def guidance(cond_out: Tensor, null_out: Tensor, cond_scale: float) -> Tensor:
    """Classifier-free guidance: move from the unconditional output towards the conditional one."""
    if cond_scale == 1.0:
        return cond_out
    return null_out + (cond_out - null_out) * cond_scale


def tile(z: Optional[Tensor], times: int) -> Optional[Tensor]:
    """Repeat a batch `times` times along dim 0 (conditioning for a doubled guidance batch); None stays None."""
    return z if z is None or times == 1 else torch.cat([z] * times)


def classifier_free_guidance(forward: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor], cond_scale: float,
                             guided_channels: Optional[int] = None) -> ModelFn:
    """model_fn(x, t) from `forward(x, t, drop_mask)`: with cond_scale != 1 the conditional and the null
    (all conditioning dropped) predictions run as one doubled batch and are combined by `guidance`; only the
    first `guided_channels` (the prediction, not a learned variance after it) are guided."""
    if cond_scale == 1.0:
        return lambda x, t: forward(x, t, None)

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        drop = torch.arange(2 * batch, device=x.device) >= batch
        cond_out, null_out = forward(torch.cat([x, x]), torch.cat([t, t]), drop).chunk(2)
        if guided_channels is None:
            return guidance(cond_out, null_out, cond_scale)
        guided = guidance(cond_out[:, :guided_channels], null_out[:, :guided_channels], cond_scale)
        return torch.cat([guided, cond_out[:, guided_channels:]], dim=1)

    return model_fn


class GaussianDiffusion(nn.Module):
    """A discrete-time Gaussian diffusion process; buffers move with `.to(device)`."""

    def __init__(
        self,
        timesteps: int = 1000,
        beta_schedule: BetaSchedule = "cosine",
        predict: Prediction = "eps",
        p2_loss_weight_gamma: float = 0.0,
        p2_loss_weight_k: float = 1.0,
        learned_variance: bool = False,
        vb_loss_weight: float = 0.001,
        betas: Optional[Tensor] = None,
        timestep_map: Optional[Tensor] = None,
    ):
        """With `learned_variance` the network outputs twice the channels: the prediction, then v in [-1, 1]
        (unconstrained) interpolating the log variance of each reverse step between the posterior's
        variance and beta (Nichol & Dhariwal 2021), trained with the variational bound weighted by
        `vb_loss_weight` next to the simple loss, and used by DDPM (DDIM reads it off and keeps eta's).
        `betas` and `timestep_map` are for `respaced`: a schedule of its own, whose step k the network knows as
        step timestep_map[k] of the schedule it was trained on."""
        super().__init__()
        self.learned_variance, self.vb_loss_weight = learned_variance, vb_loss_weight
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}, got {beta_schedule!r}")
        if predict not in ("eps", "x0", "v"):
            raise ValueError(f"predict must be 'eps', 'x0' or 'v', got {predict!r}")
        self.beta_schedule, self.predict = beta_schedule, predict
        betas = torch.from_numpy(BETA_SCHEDULES[beta_schedule](timesteps)) if betas is None else betas.double()
        self.timesteps = timesteps = len(betas)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        if alphas_cumprod[-1] > 0.01:  # sampling starts from pure noise: the last step must (nearly) reach it
            raise ValueError(f"a {beta_schedule} schedule of {timesteps} timesteps keeps {alphas_cumprod[-1]:.0%} of "
                             "the signal at its last step: use more timesteps")
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        snr = alphas_cumprod / (1 - alphas_cumprod)

        # Derived from the config, so kept out of state dicts (persistent=False): checkpoints hold weights only.
        def buffer(name: str, value: Tensor) -> None:
            self.register_buffer(name, value.float(), persistent=False)

        buffer("betas", betas)
        # the network's own step numbers (a respaced process samples with fewer, larger steps)
        self.register_buffer("timestep_map", torch.arange(timesteps) if timestep_map is None else timestep_map.long(),
                             persistent=False)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt())
        buffer("sqrt_recip_alphas_cumprod", (1 / alphas_cumprod).sqrt())
        buffer("sqrt_recipm1_alphas_cumprod", (1 / alphas_cumprod - 1).sqrt())
        buffer("posterior_variance", posterior_variance)
        # The posterior variance is 0 at t=0: clip the log so it stays finite.
        buffer("posterior_log_variance", posterior_variance.clamp(min=1e-20).log())
        # the lower end of a learned variance: the posterior's, with t=0 (where it is 0) taking t=1's value
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if timesteps > 1 else betas
        buffer("posterior_log_variance_clipped", clipped.log())
        buffer("log_betas", betas.log())
        buffer("posterior_mean_coef1", betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod))
        buffer("posterior_mean_coef2", (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod))
        # p2 weighting (Choi et al. 2022): down-weights the easy, low-noise steps; gamma=0 gives 1.
        buffer("p2_loss_weight", (p2_loss_weight_k + snr) ** -p2_loss_weight_gamma)

    # ---- forward process and parameterisations ---------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Noise `x0` to level `t`: sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def v_from(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022)."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * eps - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output, in the `predict` parameterisation."""
        if self.predict == "eps":
            return noise
        if self.predict == "x0":
            return x0
        return self.v_from(x0, noise, t)

    def x0_from_output(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Turn a raw network output back into a prediction of x0."""
        if self.predict == "eps":
            return self.x0_from_eps(x_t, t, output)
        if self.predict == "x0":
            return output
        return self.x0_from_v(x_t, t, output)

    def split_output(self, output: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(prediction, variance output or None) of a raw network output."""
        return output.chunk(2, dim=1) if self.learned_variance else (output, None)

    def model_log_variance(self, variance_output: Tensor, t: Tensor) -> Tensor:
        """The learned log variance of step t: v in [-1, 1] moves it from the posterior's to log beta."""
        frac = (variance_output.float() + 1) / 2
        low, high = extract(self.posterior_log_variance_clipped, t, frac), extract(self.log_betas, t, frac)
        return frac * high + (1 - frac) * low

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_{t-1} | x_t, x0)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance, t, x_t)

    # ---- training --------------------------------------------------------------------------------

    def loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        loss_type: LossType = "l2",
        rng: Optional[RowRandom] = None,
    ) -> Tensor:
        """The denoising loss of `model_fn` on clean data `x0`, p2-weighted, averaged over the batch; `t` and `noise`
        drawn from `rng` (each sample's own generator) or torch's global one where not given."""
        rng = rng or RowRandom(x0.shape[0], x0.device)
        t = rng.randint(self.timesteps) if t is None else t
        noise = rng.randn(*x0.shape[1:], dtype=x0.dtype) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        output, variance_output = self.split_output(model_fn(x_t, t))
        target = self.target(x0, noise, t)
        losses = {"l1": F.l1_loss, "l2": F.mse_loss, "huber": F.smooth_l1_loss}
        if loss_type not in losses:
            raise ValueError(f"loss_type must be one of {sorted(losses)}, got {loss_type!r}")
        per_sample = losses[loss_type](output.float(), target.float(), reduction="none").flatten(1).mean(1)
        per_sample = per_sample * extract(self.p2_loss_weight, t, per_sample)
        if variance_output is not None:
            per_sample = per_sample + self.vb_loss_weight * self.vb_terms(output.detach(), variance_output, x0, x_t, t)
        return per_sample.mean()

    def vb_terms(self, output: Tensor, variance_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The variational bound per sample, in bits per dimension: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for
        t > 0, the discretised decoder NLL at t = 0. `output` is detached: this term trains the variance only."""
        x0_pred = self.x0_from_output(output.float(), x_t, t)
        true_mean, _, true_log_var = self.q_posterior(x0.float(), x_t.float(), t)
        model_mean, _, _ = self.q_posterior(x0_pred, x_t.float(), t)
        model_log_var = self.model_log_variance(variance_output, t)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0.float(), model_mean, 0.5 * model_log_var).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    # ---- sampling --------------------------------------------------------------------------------

    def respaced(self, sample_timesteps: int) -> "GaussianDiffusion":
        """The same process over `sample_timesteps` evenly spaced steps (improved DDPM's respacing): the kept
        steps' abar unchanged, each step's beta the whole jump 1 - abar_k / abar_{k-1}, so DDPM over it takes
        larger steps and a learned variance interpolates between that jump's own posterior variance and beta."""
        if not 1 <= sample_timesteps <= self.timesteps:
            raise ValueError(f"sample_timesteps must be in [1, {self.timesteps}], got {sample_timesteps}")
        kept = torch.linspace(0, self.timesteps - 1, sample_timesteps).round().long().unique()
        abar = self.alphas_cumprod.double()[kept]
        betas = 1 - abar / F.pad(abar[:-1], (1, 0), value=1.0)
        return GaussianDiffusion(predict=self.predict, learned_variance=self.learned_variance,
                                 vb_loss_weight=self.vb_loss_weight, beta_schedule=self.beta_schedule, betas=betas,
                                 timestep_map=self.timestep_map[kept]).to(self.betas.device)

    def time_pairs(self, sample_timesteps: int) -> list[tuple[int, int]]:
        """(t, t_prev) pairs from T-1 down to 0, `sample_timesteps` of them; t_prev=-1 means 'clean'."""
        if not 1 <= sample_timesteps <= self.timesteps:
            raise ValueError(f"sample_timesteps must be in [1, {self.timesteps}], got {sample_timesteps}")
        times = torch.linspace(-1, self.timesteps - 1, sample_timesteps + 1).round().long().flip(0).tolist()
        return list(zip(times[:-1], times[1:]))

    def _predict(self, model_fn: ModelFn, x: Tensor, t: Tensor, x0_transform: Optional[X0Transform]):
        """(predicted x0, the variance output or None) at step t."""
        output, variance_output = self.split_output(model_fn(x, t).float())
        x0 = self.x0_from_output(output, x, t)
        return (x0_transform(x0) if x0_transform is not None else x0), variance_output

    @staticmethod
    def step_noise(x: Tensor, generator: Optional[torch.Generator], given: Optional[Iterator[Tensor]]) -> Tensor:
        """The noise of one stochastic step: the next of `given` (parity checks), else drawn from `generator`."""
        if given is not None:
            return next(given).to(device=x.device, dtype=x.dtype)
        return torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)

    def ddpm_step(self, model_fn: ModelFn, x: Tensor, t: int, x0_transform=None, generator=None,
                  noise: Optional[Iterator[Tensor]] = None) -> tuple[Tensor, Tensor]:
        """One ancestral step x_t -> x_{t-1}; returns (x_{t-1}, predicted x0)."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, variance_output = self._predict(model_fn, x, t_batch, x0_transform)
        mean, _, log_var = self.q_posterior(x0, x, t_batch)
        if variance_output is not None:
            log_var = self.model_log_variance(variance_output, t_batch)
        if t == 0:
            return mean, x0
        return mean + (0.5 * log_var).exp() * self.step_noise(x, generator, noise), x0

    def ddim_step(
        self, model_fn: ModelFn, x: Tensor, t: int, t_prev: int, eta: float = 0.0, x0_transform=None, generator=None,
        noise: Optional[Iterator[Tensor]] = None,
    ) -> tuple[Tensor, Tensor]:
        """One DDIM step x_t -> x_{t_prev} (Song et al. 2021); eta=0 is deterministic."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        # DDIM's noise is set by eta (its mean depends on it): a learned variance is read off and not used,
        # as lucidrains' DDIM does; it is DDPM that samples with it
        x0, _ = self._predict(model_fn, x, t_batch, x0_transform)
        if t_prev < 0:
            return x0, x0
        eps = self.eps_from_x0(x, t_batch, x0)
        alpha, alpha_prev = self.alphas_cumprod[t], self.alphas_cumprod[t_prev]
        sigma = eta * ((1 - alpha / alpha_prev) * (1 - alpha_prev) / (1 - alpha)).sqrt()
        direction = (1 - alpha_prev - sigma**2).clamp(min=0).sqrt() * eps
        x_prev = alpha_prev.sqrt() * x0 + direction
        if eta > 0:
            x_prev = x_prev + sigma * self.step_noise(x, generator, noise)
        return x_prev, x0

    def renoise(self, x_prev: Tensor, t_prev: int, t: int, generator=None) -> Tensor:
        """Diffuse forward from level t_prev back to level t (RePaint's resampling jump)."""
        ratio = self.alphas_cumprod[t] / self.alphas_cumprod[t_prev]
        noise = torch.randn(x_prev.shape, device=x_prev.device, generator=generator, dtype=x_prev.dtype)
        return ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        *,
        device: torch.device | str = "cpu",
        sample_timesteps: Optional[int] = None,
        eta: float = 0.0,
        x0_transform: Optional[X0Transform] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        inpaint_image: Optional[Tensor] = None,
        inpaint_mask: Optional[Tensor] = None,
        inpaint_resample_times: int = 1,
        progress: bool = False,
        sampler: Sampler = "ddim",
        step_noise: Optional[Iterator[Tensor]] = None,
    ) -> Tensor:
        """Draw samples: DDPM over all steps when `sample_timesteps` is None; else, with that many steps, DDIM
        (`sampler="ddim"`, with `eta`: 0 deterministic, 1 as stochastic as DDPM), DDPM over the respaced
        process (`sampler="ddpm"`, which samples with a learned variance where DDIM keeps eta's), or
        DPM-Solver++(2M) (`sampler="dpmpp"`: deterministic, second order; dalle2/dpm_solver.py).

        With `inpaint_image` and `inpaint_mask` (True/1 = known pixel), the known region is
        re-imposed at every noise level and each step is resampled `inpaint_resample_times` times
        (RePaint, Lugmayr et al. 2022); the known pixels of the result equal `inpaint_image`.

        `noise` is x_T and `step_noise` the noise of every stochastic step after it, in order (to check parity with
        another implementation given the same draws); both are drawn from `generator` when not given.
        """
        if sampler not in ("ddim", "ddpm", "dpmpp"):
            raise ValueError(f"sampler must be 'ddim', 'ddpm' or 'dpmpp', got {sampler!r}")
        if sampler == "dpmpp" and inpaint_image is not None:
            raise ValueError("inpainting (RePaint) resamples with DDIM or DDPM steps: sampler='dpmpp' cannot inpaint")
        if sampler == "ddpm" and sample_timesteps is not None and sample_timesteps < self.timesteps:
            respaced = self.respaced(sample_timesteps)
            timestep_map = respaced.timestep_map
            return respaced.sample(lambda x, t: model_fn(x, timestep_map[t]), shape, device=device, eta=eta,
                                   x0_transform=x0_transform, noise=noise, generator=generator,
                                   inpaint_image=inpaint_image, inpaint_mask=inpaint_mask,
                                   inpaint_resample_times=inpaint_resample_times, progress=progress,
                                   step_noise=step_noise)
        steps = sample_timesteps or self.timesteps
        # eta means something on every step count, all steps included
        use_ddim = sample_timesteps is not None and sampler == "ddim"
        if noise is None:
            noise = torch.randn(shape, device=device, generator=generator)
        x = noise
        inpainting = inpaint_image is not None
        if inpainting:
            if inpaint_mask is None:
                raise ValueError("inpaint_mask is required with inpaint_image")
            known = inpaint_mask.to(device=x.device, dtype=torch.bool).expand_as(x)
            inpaint_image = inpaint_image.to(x)

        pairs = self.time_pairs(steps)
        if sampler == "dpmpp":
            from .dpm_solver import dpmpp_2m

            def predict_x0(x_t: Tensor, t: int) -> Tensor:
                t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
                return self._predict(model_fn, x_t, t_batch, x0_transform)[0]

            return dpmpp_2m(predict_x0, x, pairs, self.alphas_cumprod)
        if progress:
            from tqdm.auto import tqdm

            pairs = tqdm(pairs, desc="sampling", leave=False)
        for t, t_prev in pairs:
            repeats = inpaint_resample_times if inpainting else 1
            for r in range(repeats):
                if inpainting:
                    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
                    noised_known = self.q_sample(inpaint_image, t_batch, torch.randn(x.shape, device=x.device, generator=generator))
                    x = torch.where(known, noised_known, x)
                if use_ddim:
                    x_prev, _ = self.ddim_step(model_fn, x, t, t_prev, eta, x0_transform, generator, step_noise)
                else:
                    x_prev, _ = self.ddpm_step(model_fn, x, t, x0_transform, generator, step_noise)
                if r < repeats - 1 and t_prev >= 0:
                    x = self.renoise(x_prev, t_prev, t, generator)
                else:
                    x = x_prev
        if inpainting:
            x = torch.where(known, inpaint_image, x)
        return x
