"""DALLE2-pytorch's checkpoints in and out. The reference modules keep their parameter names, so a state dict moves
across unchanged apart from the schedule buffers theirs saves (checked against ours, then dropped; computed as theirs
does on the way out). Checkpoints load with weights_only=True: besides tensors, only the bookkeeping objects their
trainers save (a packaging Version, a warm-up scheduler) are let through, each as an inert stand-in of ours that
holds nothing and runs nothing; anything else is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from ..configs import DecoderConfig, DiffusionConfig, PriorConfig
from .configs import decoder_config_from_theirs, decoder_config_to_theirs, prior_config_from_theirs, \
    prior_config_to_theirs, reference_only

Source = Union[str, Path, bytes]  # a path or fsspec URL, or the file's bytes
# the schedule their LowresConditioner noises an upsampler's input on (not configurable there)
THEIR_LOWRES_NOISE = DiffusionConfig(timesteps=1000, beta_schedule="linear")
# what their trainers save beside the weights: the version (packaging's Version and, in packaging < 22, the parts
# it pickles with) and DiffusionPriorTrainer's warm-up scheduler object. None of it is needed to import the weights.
TRAINER_BOOKKEEPING = ("packaging.version.Version", "packaging.version._Version", "packaging._structures.InfinityType",
                       "packaging._structures.NegativeInfinityType", "pytorch_warmup.linear.LinearWarmup",
                       "pytorch_warmup.base.LinearWarmup", "pytorch_warmup.LinearWarmup")


class Ignored:
    """The stand-in every bookkeeping object of their trainers unpickles as: accepts any arguments and state, keeps
    none of it, runs no code of theirs."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass


def read_source(source: Source) -> tuple[bytes, str]:
    """(bytes, name for messages) of a checkpoint given as bytes, a local path or an fsspec URL."""
    from ..checkpoint import read_bytes

    if isinstance(source, bytes):
        return source, "<bytes>"
    return read_bytes(str(source)), str(source)


def load_their_checkpoint(source: Source, weights: str = "model", name: str = "") -> dict[str, Tensor]:
    """A state dict from a DALLE2-pytorch checkpoint: a plain `torch.save(model.state_dict())`, or a trainer's save,
    whose `weights` entry ("model", or "ema" for the EMA copy) is taken. Loaded with weights_only=True; `name` says
    which file it is in messages (its path by default)."""
    from ..checkpoint import load_untrusted

    data, default_name = read_source(source)
    name = name or default_name
    loaded = load_untrusted(data, name, allowed=[(Ignored, global_name) for global_name in TRAINER_BOOKKEEPING])
    if not isinstance(loaded, dict):
        raise ValueError(f"{name} holds a {type(loaded).__name__}, not a state dict or a trainer's save")
    if "model" in loaded and isinstance(loaded["model"], dict):  # a trainer's save
        if weights == "ema":
            if "ema_model" in loaded:  # the prior trainer saves the EMA prior by itself
                return loaded["ema_model"]
            if "ema" not in loaded:
                raise ValueError(f"{name} has no EMA weights (saved with use_ema=False): import --weights model")
            # the decoder trainer saves ModuleList([EMA(unet), ...]): '<i>.ema_model.<key>' -> 'unets.<i>.<key>'
            # (each EMA's own 'initted' and 'step' buffers are left out)
            return {f"unets.{k.split('.', 2)[0]}.{k.split('.', 2)[2]}": v for k, v in loaded["ema"].items()
                    if k.split(".", 2)[1:2] == ["ema_model"]}
        return loaded["model"]
    if weights == "ema":
        raise ValueError(f"{name} is a plain state dict: it has no separate EMA weights")
    bad = [k for k, v in loaded.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{name} is neither a state dict nor a trainer's save: {bad[:3]} are not tensors")
    return loaded


def _check_schedule(state: dict, prefix: str, betas: Tensor, where: str) -> None:
    saved = state.get(f"{prefix}betas")
    # compared at the precision it was saved in: LAION's fp16 checkpoints hold fp16 schedules
    if saved is not None and (saved.shape != betas.shape or
                              not torch.allclose(saved.float(), betas.to(saved.dtype).float(), rtol=1e-5, atol=1e-7)):
        raise ValueError(f"{where}: the checkpoint's {prefix}betas do not match the config's schedule "
                         f"({len(saved)} saved steps, {len(betas)} configured): wrong config for these weights?")


def prior_state_from_theirs(state: dict[str, Tensor], config: PriorConfig) -> dict[str, Tensor]:
    """Their DiffusionPrior state dict as ours: the network's weights (same names), schedule checked and dropped."""
    from ..diffusion import GaussianDiffusion

    d = config.diffusion
    _check_schedule(state, "noise_scheduler.", GaussianDiffusion(d.timesteps, d.beta_schedule).betas, "prior")
    if not any(k.startswith("net.") for k in state):
        raise ValueError("the prior checkpoint has no 'net.' weights: is it a decoder's?")
    return {k: v for k, v in state.items() if k.startswith("net.")}


def decoder_state_from_theirs(state: dict[str, Tensor], config: DecoderConfig) -> dict[str, Tensor]:
    """Their Decoder state dict as ours: the unets' weights (same names), schedules checked and dropped."""
    from ..diffusion import GaussianDiffusion

    for i in range(len(config.unets)):
        d = config.diffusion_for(i)
        _check_schedule(state, f"noise_schedulers.{i}.", GaussianDiffusion(d.timesteps, d.beta_schedule).betas,
                        f"decoder unet {i + 1}")
    if not any(k.startswith("unets.") for k in state):
        raise ValueError("the decoder checkpoint has no 'unets.' weights: is it a prior's?")
    return {k: v for k, v in state.items() if k.startswith("unets.")}


def prior_state_to_theirs(prior: torch.nn.Module) -> dict[str, Tensor]:
    """Our prior's state dict as theirs holds it: the network, and the schedule buffers their NoiseScheduler saves."""
    reference_only("prior", prior.config.net.arch)
    state = {k: v for k, v in prior.state_dict().items() if k.startswith("net.")}
    state.update(_their_schedule(prior.config.diffusion, "noise_scheduler."))
    return state


def decoder_state_to_theirs(decoder: torch.nn.Module) -> dict[str, Tensor]:
    """Our decoder's state dict as theirs holds it, with each unet's schedule buffers."""
    for i, u in enumerate(decoder.config.unets):
        reference_only(f"decoder's unet {i + 1}", u.arch)
    state = {k: v for k, v in decoder.state_dict().items() if k.startswith("unets.")}
    for i, unet in enumerate(decoder.config.unets):
        state.update(_their_schedule(decoder.config.diffusion_for(i), f"noise_schedulers.{i}."))
        if unet.lowres_noise_cond:  # their low-res conditioner noises on a schedule of its own, fixed in their code
            state.update(_their_schedule(THEIR_LOWRES_NOISE, f"lowres_conds.{i}.noise_scheduler."))
    return state


def _their_schedule(diffusion: DiffusionConfig, prefix: str) -> dict[str, Tensor]:
    """The buffers their NoiseScheduler registers (persistent, so in their state dicts), computed as theirs does: in
    float64 from the schedule, then stored as float32."""
    from ..schedules import BETA_SCHEDULES

    betas = torch.from_numpy(BETA_SCHEDULES[diffusion.beta_schedule](diffusion.timesteps))
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    prev = torch.nn.functional.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    values = dict(
        betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=prev,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
        log_one_minus_alphas_cumprod=(1 - alphas_cumprod).log(), sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(), posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_variance.clamp(min=1e-20).log(),
        posterior_mean_coef1=betas * prev.sqrt() / (1 - alphas_cumprod),
        posterior_mean_coef2=(1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        p2_loss_weight=(diffusion.p2_loss_weight_k + alphas_cumprod / (1 - alphas_cumprod))
        ** -diffusion.p2_loss_weight_gamma,
    )
    return {prefix + k: v.float() for k, v in values.items()}


# ---- whole models --------------------------------------------------------------------------------


def prior_from_theirs(checkpoint: Source, config: dict, weights: str = "model", clip=None, name: str = ""):
    """Our DiffusionPrior from their checkpoint (path, fsspec URL or bytes) and config (the parsed JSON): every option
    is checked before any weight is read."""
    from ..prior import DiffusionPrior

    prior_config = prior_config_from_theirs(config)
    prior = DiffusionPrior(config=prior_config, clip=clip)
    name = name or ("<bytes>" if isinstance(checkpoint, bytes) else str(checkpoint))
    load_exactly(prior, prior_state_from_theirs(load_their_checkpoint(checkpoint, weights, name), prior_config), name)
    return prior


def decoder_from_theirs(checkpoint: Source, config: dict, weights: str = "model", clip=None, name: str = ""):
    """Our Decoder from their checkpoint (path, fsspec URL or bytes) and config (the parsed JSON): every option is
    checked before any weight is read."""
    from ..decoder import Decoder

    decoder_config = decoder_config_from_theirs(config)
    decoder = Decoder(config=decoder_config, clip=clip)
    name = name or ("<bytes>" if isinstance(checkpoint, bytes) else str(checkpoint))
    state = decoder_state_from_theirs(load_their_checkpoint(checkpoint, weights, name), decoder_config)
    load_exactly(decoder, state, name)
    return decoder


def load_exactly(model: torch.nn.Module, state: dict[str, Tensor], name: str) -> None:
    """Every weight of the model (its CLIP aside) from `state` and nothing else, each of its shape (named when not)."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} (the config builds {tuple(v.shape)})" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{name} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shapes {wrong[:5]}")
    model.load_state_dict(state, strict=False)


def to_theirs(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict]:
    """(state dict, config section) of our prior or decoder in their format: `torch.save` the first and
    `json.dump` the second, and DALLE2-pytorch's train configs and trainers load them."""
    from ..prior import DiffusionPrior

    if isinstance(model, DiffusionPrior):
        return prior_state_to_theirs(model), {"prior": prior_config_to_theirs(model.config)}
    return decoder_state_to_theirs(model), {"decoder": decoder_config_to_theirs(model.config)}
