"""DALLE2-pytorch's configs and checkpoints in and out: LAION's priors and decoders become this project's models.

Their JSON configs (the `prior` section of a TrainDiffusionPriorConfig, the `decoder` section of a TrainDecoderConfig)
become our typed configs in the reference architecture, with DALLE2-pytorch 1.15.6's defaults for what a file leaves
out. The reference modules keep their parameter names, so a state dict moves across unchanged apart from the
schedule buffers theirs saves (checked against ours, then dropped). Every option we cannot honour is refused by
name before a weight is read. Checkpoints load with weights_only=True; the one class their trainers save beside the
weights, packaging's Version, is allowed by name, and anything else is refused with the reason.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from .configs import DecoderConfig, DiffusionConfig, PriorConfig, UnetConfig

# their DiffusionPriorNetwork / DiffusionPrior / Unet / Decoder defaults in 1.15.6, for what a config file leaves out
THEIR_NET = dict(max_text_len=256, num_timesteps=None, num_time_embeds=1, num_image_embeds=1, num_text_embeds=1,
                 dim_head=64, heads=8, ff_mult=4, norm_in=False, norm_out=True, attn_dropout=0.0, ff_dropout=0.0,
                 final_proj=True, normformer=False, rotary_emb=True, self_cond=False)
THEIR_PRIOR = dict(image_channels=3, timesteps=1000, sample_timesteps=None, cond_drop_prob=0.0,
                   text_cond_drop_prob=None, image_cond_drop_prob=None, loss_type="l2", predict_x_start=True,
                   predict_v=False, beta_schedule="cosine", condition_on_text_encodings=True,
                   sampling_clamp_l2norm=False, sampling_final_clamp_l2norm=False, training_clamp_l2norm=False,
                   init_image_embed_l2norm=False, image_embed_scale=None, clip=None, image_size=None)
THEIR_UNET = dict(image_embed_dim=None, text_embed_dim=None, cond_dim=None, num_image_tokens=4, num_time_tokens=2,
                  out_dim=None, dim_mults=(1, 2, 4, 8), channels=3, channels_out=None, self_attn=False,
                  attn_dim_head=32, attn_heads=16, lowres_cond=False, lowres_noise_cond=False, self_cond=False,
                  sparse_attn=False, cosine_sim_cross_attn=False, cosine_sim_self_attn=False, attend_at_middle=True,
                  cond_on_text_encodings=False, max_text_len=256, cond_on_image_embeds=False,
                  add_image_embeds_to_time=True, init_dim=None, init_conv_kernel_size=7, resnet_groups=8,
                  resnet_weight_standardization=False, num_resnet_blocks=2, init_cross_embed=True,
                  init_cross_embed_kernel_sizes=(3, 7, 15), cross_embed_downsample=False,
                  cross_embed_downsample_kernel_sizes=(2, 4), memory_efficient=False, scale_skip_connection=False,
                  pixel_shuffle_upsample=True, final_conv_kernel_size=1, combine_upsample_fmaps=False,
                  checkpoint_during_training=False)
THEIR_DECODER = dict(image_size=None, image_sizes=None, clip=None, channels=3, vae=(), timesteps=1000,
                     sample_timesteps=None, image_cond_drop_prob=0.1, text_cond_drop_prob=0.5, loss_type="l2",
                     beta_schedule=None, predict_x_start=False, predict_v=False,
                     predict_x_start_for_latent_diffusion=False, random_crop_sizes=None,
                     use_noise_for_lowres_cond=False, use_blur_for_lowres_cond=True, lowres_downsample_first=True,
                     blur_prob=0.5, blur_sigma=0.6, blur_kernel_size=3, lowres_noise_sample_level=0.2,
                     clip_denoised=True, clip_x_start=True, learned_variance=True,
                     learned_variance_constrain_frac=False, vb_loss_weight=0.001, unconditional=False,
                     auto_normalize_img=True, use_dynamic_thres=False, dynamic_thres_percentile=0.95,
                     p2_loss_weight_gamma=0.0, p2_loss_weight_k=1, ddim_sampling_eta=0.0)
# the schedule their LowresConditioner noises an upsampler's input on (not configurable there)
THEIR_LOWRES_NOISE = DiffusionConfig(timesteps=1000, beta_schedule="linear")
# options that change nothing a checkpoint holds or how it samples: taken and left aside
TRAINING_ONLY = {"checkpoint_during_training", "blur_kernel_size", "clip", "image_size", "attend_at_middle",
                 "out_dim", "lowres_cond", "lowres_noise_cond", "cond_on_image_embeds", "channels_out",
                 "ddim_sampling_eta", "clip_x_start"}


class UnsupportedOption(ValueError):
    """A DALLE2-pytorch option this project does not implement; the message names it."""


def _refuse(where: str, option: str, value: Any, why: str) -> None:
    raise UnsupportedOption(f"{where}.{option} = {value!r} is not supported: {why}")


def _with_defaults(where: str, given: dict, defaults: dict, required: tuple[str, ...] = ()) -> dict:
    unknown = sorted(set(given) - set(defaults) - set(required) - {"net", "unets"})
    if unknown:
        raise UnsupportedOption(f"{where} has options DALLE2-pytorch 1.15.6 does not define, or this importer does "
                                f"not know: {', '.join(unknown)}")
    missing = [name for name in required if name not in given]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    return {**defaults, **given}


def per_unet(value: Any, count: int, fill: Any = None) -> list:
    """Their cast_tuple + pad: one value for every unet, or a list padded with `fill`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * (1 if fill is not None else count)
    return values + [fill] * (count - len(values))


# ---- configs: theirs -> ours ---------------------------------------------------------------------


def prior_config_from_theirs(prior: dict) -> PriorConfig:
    """Our PriorConfig (reference architecture) from the `prior` section of their config file."""
    if "prior" in prior:
        prior = prior["prior"]
    p = _with_defaults("prior", prior, THEIR_PRIOR, required=("net", "image_embed_dim"))
    net = _with_defaults("prior.net", p["net"], THEIR_NET, required=("dim", "depth"))
    if net["self_cond"]:
        _refuse("prior.net", "self_cond", True, "self-conditioning is not implemented")
    if p["image_embed_dim"] != net["dim"]:
        raise ValueError(f"prior.image_embed_dim ({p['image_embed_dim']}) differs from prior.net.dim ({net['dim']}): "
                         "DALLE2-pytorch cannot build that prior either")
    if p["image_channels"] != 3:
        _refuse("prior", "image_channels", p["image_channels"], "CLIP here takes RGB images")
    for option in ("text_cond_drop_prob", "image_cond_drop_prob"):
        if p[option] is not None and p[option] != p["cond_drop_prob"]:
            _refuse("prior", option, p[option], "one drop probability (cond_drop_prob) drops text and image together")
    if not p["predict_x_start"] or p["predict_v"]:
        _refuse("prior", "predict_x_start" if not p["predict_x_start"] else "predict_v", False if not
                p["predict_x_start"] else True, "their sampler clamps an eps- or v-prior's x0 to [-1, 1], which ours "
                "does not; only x0-predicting priors (LAION's) import")
    for option in ("training_clamp_l2norm", "init_image_embed_l2norm"):
        if p[option]:
            _refuse("prior", option, True, "not implemented")
    if p["image_embed_scale"] is not None and not math.isclose(p["image_embed_scale"], net["dim"] ** 0.5):
        _refuse("prior", "image_embed_scale", p["image_embed_scale"], f"ours is sqrt(dim) = {net['dim'] ** 0.5:g}")
    if p["beta_schedule"] not in ("cosine", "linear"):
        _refuse("prior", "beta_schedule", p["beta_schedule"], "only cosine and linear schedules exist here")
    network = {k: net[k] for k in ("dim", "depth", "heads", "dim_head", "ff_mult", "attn_dropout", "ff_dropout",
                                   "normformer", "rotary_emb", "norm_in", "norm_out", "final_proj", "num_timesteps",
                                   "num_time_embeds", "num_image_embeds", "num_text_embeds")}
    return PriorConfig(
        net=dict(arch="reference", max_text_len=net["max_text_len"] or 256, **network),
        predict="x0", cond_drop_prob=p["cond_drop_prob"],
        condition_on_text_encodings=p["condition_on_text_encodings"],
        sampling_clamp_l2norm=p["sampling_clamp_l2norm"],
        diffusion=dict(timesteps=p["timesteps"], sample_timesteps=p["sample_timesteps"],
                       beta_schedule=p["beta_schedule"], loss_type=p["loss_type"]),
    )


def decoder_config_from_theirs(decoder: dict) -> DecoderConfig:
    """Our DecoderConfig (reference unets) from the `decoder` section of their config file."""
    if "decoder" in decoder:
        decoder = decoder["decoder"]
    d = _with_defaults("decoder", decoder, THEIR_DECODER, required=("unets",))
    count = len(d["unets"])
    refusals = [("vae", bool(d["vae"]), "latent diffusion (VQGAN-VAE) is not implemented"),
                ("random_crop_sizes", any(s is not None for s in per_unet(d["random_crop_sizes"], count)),
                 "training on crops is not implemented yet"),
                ("predict_x_start_for_latent_diffusion", d["predict_x_start_for_latent_diffusion"], "no latents here"),
                ("lowres_downsample_first", not d["lowres_downsample_first"], "the low-res input is always resized "
                 "down first"),
                ("clip_denoised", not d["clip_denoised"], "x0 is always clamped or thresholded while sampling"),
                ("learned_variance_constrain_frac", d["learned_variance_constrain_frac"], "not implemented"),
                ("auto_normalize_img", not d["auto_normalize_img"], "images are [0, 1] at the API")]
    for option, refused, why in refusals:
        if refused:
            _refuse("decoder", option, d[option], why)
    predictions = {("x0" if x0 else "eps") if not v else "v" for x0, v in
                   zip(per_unet(d["predict_x_start"], count), per_unet(d["predict_v"], count))}
    if len(predictions) > 1:
        _refuse("decoder", "predict_x_start", d["predict_x_start"], "one prediction target for every unet")
    sizes = d["image_sizes"] or [d["image_size"]]
    if sizes == [None]:
        raise ValueError("decoder needs image_sizes (or image_size)")
    schedules = d["beta_schedule"] or ["cosine"] * max(count - 1, 1) + ["linear"] * int(count > 1)
    noise_flags = per_unet(d["use_noise_for_lowres_cond"], count - 1)
    noise_flags = noise_flags if len(noise_flags) == count else [False, *noise_flags]
    blur_flags = per_unet(d["use_blur_for_lowres_cond"], count - 1)
    blur_flags = blur_flags if len(blur_flags) == count else [False, *blur_flags]
    if len(set(blur_flags[1:])) > 1:
        _refuse("decoder", "use_blur_for_lowres_cond", d["use_blur_for_lowres_cond"], "blurred for all upsamplers or none")
    learned = per_unet(d["learned_variance"], count, fill=False)
    sigma = d["blur_sigma"]
    unets = [unet_config_from_theirs(u, index=i, unconditional=d["unconditional"], learned_variance=learned[i],
                                     lowres_noise_cond=noise_flags[i]) for i, u in enumerate(d["unets"])]
    samples = per_unet(d["sample_timesteps"], count)
    gammas = per_unet(d["p2_loss_weight_gamma"], count)
    for i, schedule in enumerate(schedules):
        if schedule not in ("cosine", "linear"):
            _refuse("decoder", f"beta_schedule[{i}]", schedule, "only cosine and linear schedules exist here")
    return DecoderConfig(
        unets=unets, image_sizes=tuple(sizes), channels=d["channels"], predict=predictions.pop(),
        diffusion=[dict(timesteps=d["timesteps"], sample_timesteps=samples[i], beta_schedule=schedules[i],
                        loss_type=d["loss_type"], p2_loss_weight_gamma=gammas[i], p2_loss_weight_k=d["p2_loss_weight_k"])
                   for i in range(count)],
        image_cond_drop_prob=d["image_cond_drop_prob"], text_cond_drop_prob=d["text_cond_drop_prob"],
        unconditional=d["unconditional"], lowres_sample_noise=d["lowres_noise_sample_level"],
        lowres_blur_prob=d["blur_prob"] if any(blur_flags[1:]) else 0.0,
        lowres_blur_sigma=tuple(sigma) if isinstance(sigma, (list, tuple)) else (sigma, sigma),
        dynamic_threshold_percentile=d["dynamic_thres_percentile"] if d["use_dynamic_thres"] else None,
        learned_variance=tuple(learned), vb_loss_weight=d["vb_loss_weight"], guidance_on_variance=True,
    )


def unet_config_from_theirs(unet: dict, index: int, unconditional: bool, learned_variance: bool,
                            lowres_noise_cond: bool) -> UnetConfig:
    """One of their Unet configs as their Decoder casts it (low-res input, image embeds on the first unet only)."""
    where = f"decoder.unets[{index}]"
    u = _with_defaults(where, unet, THEIR_UNET, required=("dim",))
    for option, why in (("self_cond", "self-conditioning is not implemented"),
                        ("combine_upsample_fmaps", "combining the upsampling feature maps is not implemented")):
        if u[option]:
            _refuse(where, option, True, why)
    groups = set(u["resnet_groups"]) if isinstance(u["resnet_groups"], (list, tuple)) else {u["resnet_groups"]}
    if len(groups) > 1:
        _refuse(where, "resnet_groups", u["resnet_groups"], "one group count for every level")
    if u["init_dim"] not in (None, u["dim"]):
        _refuse(where, "init_dim", u["init_dim"], "DALLE2-pytorch's final block expects init_dim == dim")
    cond_on_image = not unconditional and index == 0
    levels = len(u["dim_mults"])
    self_attn = u["self_attn"]
    self_attn = tuple(self_attn) + (False,) * (levels - len(self_attn)) if isinstance(self_attn, (list, tuple)) \
        else (bool(self_attn),) * levels
    if cond_on_image and u["image_embed_dim"] is None:
        raise ValueError(f"{where}.image_embed_dim is needed: the first unet conditions on the image embed")
    blocks = u["num_resnet_blocks"]
    return UnetConfig(
        arch="reference", dim=u["dim"], dim_mults=tuple(u["dim_mults"]),
        num_resnet_blocks=tuple(blocks) if isinstance(blocks, (list, tuple)) else blocks, layer_attns=self_attn,
        channels=u["channels"], image_embed_dim=u["image_embed_dim"] or 512, num_image_tokens=u["num_image_tokens"],
        cond_dim=u["cond_dim"], cond_on_text_encodings=not unconditional and bool(u["cond_on_text_encodings"]),
        text_encoding_dim=u["text_embed_dim"], max_text_len=u["max_text_len"], lowres_cond=index > 0,
        learned_variance=learned_variance, attn_heads=u["attn_heads"], attn_dim_head=u["attn_dim_head"],
        groups=groups.pop(), cond_on_image_embeds=cond_on_image, lowres_noise_cond=lowres_noise_cond,
        **{k: (tuple(u[k]) if isinstance(u[k], list) else u[k]) for k in (
            "add_image_embeds_to_time", "num_time_tokens", "init_cross_embed", "init_cross_embed_kernel_sizes",
            "init_conv_kernel_size", "sparse_attn", "memory_efficient", "cross_embed_downsample",
            "cross_embed_downsample_kernel_sizes", "pixel_shuffle_upsample", "scale_skip_connection",
            "resnet_weight_standardization", "cosine_sim_cross_attn", "cosine_sim_self_attn",
            "final_conv_kernel_size")},
    )


# ---- configs: ours -> theirs ---------------------------------------------------------------------


def _reference_only(kind: str, arch: str) -> None:
    if arch != "reference":
        raise UnsupportedOption(f"the {kind} uses the compact architecture, which DALLE2-pytorch has no equivalent of: "
                                "only reference-architecture models export")


def prior_config_to_theirs(config: PriorConfig) -> dict:
    """The `prior` section of their config file for one of our reference-architecture priors."""
    net, diffusion = config.net, config.diffusion
    _reference_only("prior", net.arch)
    if config.predict != "x0":
        _refuse("prior", "predict", config.predict, "their sampler clamps an eps- or v-prior's x0 to [-1, 1]")
    if diffusion.p2_loss_weight_gamma:
        _refuse("prior.diffusion", "p2_loss_weight_gamma", diffusion.p2_loss_weight_gamma, "their prior has none")
    their_net = {k: getattr(net, k) for k in ("dim", "depth", "max_text_len", "num_timesteps", "num_time_embeds",
                                              "num_image_embeds", "num_text_embeds", "dim_head", "heads", "ff_mult",
                                              "norm_in", "norm_out", "attn_dropout", "ff_dropout", "final_proj",
                                              "normformer", "rotary_emb")}
    return dict(net=their_net, image_embed_dim=net.dim, image_size=224, image_channels=3,
                timesteps=diffusion.timesteps, sample_timesteps=diffusion.sample_timesteps,
                cond_drop_prob=config.cond_drop_prob, loss_type=diffusion.loss_type, predict_x_start=True,
                beta_schedule=diffusion.beta_schedule, condition_on_text_encodings=config.condition_on_text_encodings,
                sampling_clamp_l2norm=config.sampling_clamp_l2norm)


def decoder_config_to_theirs(config: DecoderConfig) -> dict:
    """The `decoder` section of their config file for one of our reference-architecture decoders."""
    diffusions = [config.diffusion_for(i) for i in range(len(config.unets))]
    if len({(d.timesteps, d.loss_type, d.p2_loss_weight_k) for d in diffusions}) > 1:
        raise UnsupportedOption("decoder.diffusion: their decoder shares timesteps, loss_type and p2_loss_weight_k "
                                "across unets, and these differ")
    unets = []
    for i, u in enumerate(config.unets):
        _reference_only(f"decoder's unet {i + 1}", u.arch)
        if u.cond_on_image_embeds != (i == 0 and not config.unconditional):
            _refuse(f"decoder.unets[{i}]", "cond_on_image_embeds", u.cond_on_image_embeds,
                    "their decoder conditions the first unet on the image embed, and only it")
        unets.append(dict(
            dim=u.dim, dim_mults=list(u.dim_mults), image_embed_dim=u.image_embed_dim,
            text_embed_dim=u.text_encoding_dim or (u.image_embed_dim if u.cond_on_text_encodings else None),
            cond_dim=u.cond_dim,
            num_image_tokens=u.num_image_tokens, channels=u.channels, self_attn=list(u.per_level("layer_attns")),
            attn_dim_head=u.attn_dim_head, attn_heads=u.attn_heads, cond_on_text_encodings=u.cond_on_text_encodings,
            max_text_len=u.max_text_len, resnet_groups=u.groups,
            num_resnet_blocks=list(u.num_resnet_blocks) if isinstance(u.num_resnet_blocks, tuple) else u.num_resnet_blocks,
            **{k: (list(getattr(u, k)) if isinstance(getattr(u, k), tuple) else getattr(u, k)) for k in (
                "add_image_embeds_to_time", "num_time_tokens", "init_cross_embed", "init_cross_embed_kernel_sizes",
                "init_conv_kernel_size", "sparse_attn", "memory_efficient", "cross_embed_downsample",
                "cross_embed_downsample_kernel_sizes", "pixel_shuffle_upsample", "scale_skip_connection",
                "resnet_weight_standardization", "cosine_sim_cross_attn", "cosine_sim_self_attn",
                "final_conv_kernel_size")}))
    low, high = config.lowres_blur_sigma
    if low != high:
        _refuse("decoder", "lowres_blur_sigma", config.lowres_blur_sigma, "their blur has one sigma")
    return dict(
        unets=unets, image_sizes=list(config.image_sizes), channels=config.channels,
        timesteps=diffusions[0].timesteps, sample_timesteps=[d.sample_timesteps for d in diffusions],
        loss_type=diffusions[0].loss_type, beta_schedule=[d.beta_schedule for d in diffusions],
        predict_x_start=config.predict == "x0", predict_v=config.predict == "v",
        learned_variance=list(config.learned_variance_flags()), image_cond_drop_prob=config.image_cond_drop_prob,
        text_cond_drop_prob=config.text_cond_drop_prob, unconditional=config.unconditional,
        use_noise_for_lowres_cond=[u.lowres_noise_cond for u in config.unets[1:]],
        use_blur_for_lowres_cond=config.lowres_blur_prob > 0, blur_prob=config.lowres_blur_prob, blur_sigma=low,
        lowres_noise_sample_level=config.lowres_sample_noise, vb_loss_weight=config.vb_loss_weight,
        use_dynamic_thres=config.dynamic_threshold_percentile is not None,
        dynamic_thres_percentile=config.dynamic_threshold_percentile or 0.95,
        p2_loss_weight_gamma=[d.p2_loss_weight_gamma for d in diffusions], p2_loss_weight_k=diffusions[0].p2_loss_weight_k,
    )


# ---- checkpoints ---------------------------------------------------------------------------------


def load_their_checkpoint(source: Union[str, Path, bytes], weights: str = "model") -> dict[str, Tensor]:
    """A state dict from a DALLE2-pytorch checkpoint: a plain `torch.save(model.state_dict())`, or a trainer's save,
    whose `weights` entry ("model", or "ema" for the EMA copy) is taken. Loaded with weights_only=True."""
    from packaging.version import Version

    from .checkpoint import load_untrusted

    name = "<bytes>" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    # their prior trainer saves its version as a packaging Version: that class alone is allowed besides tensors
    loaded = load_untrusted(data, name, allowed=[Version])
    if not isinstance(loaded, dict):
        raise ValueError(f"{name} holds a {type(loaded).__name__}, not a state dict or a trainer's save")
    if "model" in loaded and isinstance(loaded["model"], dict):  # a trainer's save
        if weights == "ema":
            if "ema_model" in loaded:  # the prior trainer saves the EMA prior by itself
                return loaded["ema_model"]
            if "ema" not in loaded:
                raise ValueError(f"{name} has no EMA weights (saved with use_ema=False)")
            # the decoder trainer saves ModuleList([EMA(unet), ...]): '<i>.ema_model.<key>' -> 'unets.<i>.<key>'
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
    from .diffusion import GaussianDiffusion

    d = config.diffusion
    _check_schedule(state, "noise_scheduler.", GaussianDiffusion(d.timesteps, d.beta_schedule).betas, "prior")
    if not any(k.startswith("net.") for k in state):
        raise ValueError("the prior checkpoint has no 'net.' weights: is it a decoder's?")
    return {k: v for k, v in state.items() if k.startswith("net.")}


def decoder_state_from_theirs(state: dict[str, Tensor], config: DecoderConfig) -> dict[str, Tensor]:
    """Their Decoder state dict as ours: the unets' weights (same names), schedules checked and dropped."""
    from .diffusion import GaussianDiffusion

    for i in range(len(config.unets)):
        d = config.diffusion_for(i)
        _check_schedule(state, f"noise_schedulers.{i}.", GaussianDiffusion(d.timesteps, d.beta_schedule).betas,
                        f"decoder unet {i + 1}")
    if not any(k.startswith("unets.") for k in state):
        raise ValueError("the decoder checkpoint has no 'unets.' weights: is it a prior's?")
    return {k: v for k, v in state.items() if k.startswith("unets.")}


def prior_state_to_theirs(prior: torch.nn.Module) -> dict[str, Tensor]:
    """Our prior's state dict as theirs holds it: the network, and the schedule buffers their NoiseScheduler saves."""
    _reference_only("prior", prior.config.net.arch)
    state = {k: v for k, v in prior.state_dict().items() if k.startswith("net.")}
    state.update(_their_schedule(prior.config.diffusion, "noise_scheduler."))
    return state


def decoder_state_to_theirs(decoder: torch.nn.Module) -> dict[str, Tensor]:
    """Our decoder's state dict as theirs holds it, with each unet's schedule buffers."""
    for i, u in enumerate(decoder.config.unets):
        _reference_only(f"decoder's unet {i + 1}", u.arch)
    state = {k: v for k, v in decoder.state_dict().items() if k.startswith("unets.")}
    for i, unet in enumerate(decoder.config.unets):
        state.update(_their_schedule(decoder.config.diffusion_for(i), f"noise_schedulers.{i}."))
        if unet.lowres_noise_cond:  # their low-res conditioner noises on a schedule of its own, fixed in their code
            state.update(_their_schedule(THEIR_LOWRES_NOISE, f"lowres_conds.{i}.noise_scheduler."))
    return state


def _their_schedule(diffusion: DiffusionConfig, prefix: str) -> dict[str, Tensor]:
    """The buffers their NoiseScheduler registers (persistent, so in their state dicts), computed as theirs does: in
    float64 from the schedule, then stored as float32."""
    from .schedules import BETA_SCHEDULES

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


def read_their_config(path: Union[str, Path]) -> dict:
    """Their JSON config file (a TrainDiffusionPriorConfig / TrainDecoderConfig, or just its prior / decoder part)."""
    import json

    with open(path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a DALLE2-pytorch config is a JSON object")
    return config
