"""DALLE2-pytorch's JSON configs as ours and back: the `prior` section of a TrainDiffusionPriorConfig and the `decoder`
section of a TrainDecoderConfig become our typed configs in the reference architecture, with DALLE2-pytorch 1.15.6's
defaults for what a file leaves out. Every option we cannot honour is refused by name (UnsupportedOption) before any
weight is read; options that change nothing a checkpoint holds or how it samples are taken and left aside, said once.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Union

from ..configs import DecoderConfig, PriorConfig, UnetConfig

log = logging.getLogger(__name__)

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
# options that change nothing a checkpoint holds or how it samples: taken and left aside
TRAINING_ONLY = {"checkpoint_during_training", "blur_kernel_size", "clip", "image_size", "attend_at_middle",
                 "out_dim", "lowres_cond", "lowres_noise_cond", "cond_on_image_embeds", "channels_out",
                 "clip_x_start"}


# options named and meaning the same on both sides: their prior network's, and their unet's beyond what UnetConfig
# has always had (the rest are mapped one by one)
SAME_NET_OPTIONS = ("dim", "depth", "heads", "dim_head", "ff_mult", "attn_dropout", "ff_dropout", "normformer",
                    "rotary_emb", "norm_in", "norm_out", "final_proj", "num_timesteps", "num_time_embeds",
                    "num_image_embeds", "num_text_embeds")
SAME_UNET_OPTIONS = ("add_image_embeds_to_time", "num_time_tokens", "init_cross_embed", "init_cross_embed_kernel_sizes",
                     "init_conv_kernel_size", "sparse_attn", "memory_efficient", "cross_embed_downsample",
                     "cross_embed_downsample_kernel_sizes", "pixel_shuffle_upsample", "scale_skip_connection",
                     "resnet_weight_standardization", "cosine_sim_cross_attn", "cosine_sim_self_attn",
                     "final_conv_kernel_size")


class UnsupportedOption(ValueError):
    """A DALLE2-pytorch option this project does not implement; the message names it."""


def _refuse(where: str, option: str, value: Any, why: str) -> None:
    raise UnsupportedOption(f"{where}.{option} = {value!r} is not supported: {why}")


def _with_defaults(where: str, given: dict, defaults: dict, required: tuple[str, ...] = ()) -> dict:
    """`given` over their defaults; an option they do not define is refused, one that changes nothing here noted."""
    unknown = sorted(set(given) - set(defaults) - set(required) - {"net", "unets"})
    if unknown:
        raise UnsupportedOption(f"{where} has options DALLE2-pytorch 1.15.6 does not define, or this importer does "
                                f"not know: {', '.join(unknown)}")
    missing = [name for name in required if name not in given]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    aside = sorted(k for k in set(given) & TRAINING_ONLY if given[k] != defaults.get(k) and k != "clip")
    if aside:
        log.info("%s: %s change nothing the weights hold or how they sample here: left aside", where, ", ".join(aside))
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
    for option, refused in (("predict_x_start", not p["predict_x_start"]), ("predict_v", p["predict_v"])):
        if refused:  # only x0-predicting priors (LAION's) import
            _refuse("prior", option, p[option], "their sampler clamps an eps- or v-prior's x0 to [-1, 1], which ours "
                    "does not")
    for option in ("training_clamp_l2norm", "init_image_embed_l2norm"):
        if p[option]:
            _refuse("prior", option, True, "not implemented")
    if p["image_embed_scale"] is not None and not math.isclose(p["image_embed_scale"], net["dim"] ** 0.5):
        _refuse("prior", "image_embed_scale", p["image_embed_scale"], f"ours is sqrt(dim) = {net['dim'] ** 0.5:g}")
    if p["beta_schedule"] not in ("cosine", "linear"):
        _refuse("prior", "beta_schedule", p["beta_schedule"], "only cosine and linear schedules exist here")
    network = {k: net[k] for k in SAME_NET_OPTIONS}
    return PriorConfig(
        net=dict(arch="reference", max_text_len=net["max_text_len"] or 256, **network),
        predict="x0", cond_drop_prob=p["cond_drop_prob"],
        condition_on_text_encodings=p["condition_on_text_encodings"],
        sampling_clamp_l2norm=p["sampling_clamp_l2norm"],
        # their prior samples with its own DDIM at eta 1 (DiffusionPrior.sample) when sample_timesteps is set
        diffusion=dict(timesteps=p["timesteps"], sample_timesteps=p["sample_timesteps"], sampler="reference", eta=1.0,
                       beta_schedule=p["beta_schedule"], loss_type=p["loss_type"]),
    )


def decoder_config_from_theirs(decoder: dict) -> DecoderConfig:
    """Our DecoderConfig (reference unets) from the `decoder` section of their config file."""
    if "decoder" in decoder:
        decoder = decoder["decoder"]
    d = _with_defaults("decoder", decoder, THEIR_DECODER, required=("unets",))
    count = len(d["unets"])
    refusals = [("vae", bool(d["vae"]), "latent diffusion (VQGAN-VAE) is not implemented"),
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
    crops = per_unet(d["random_crop_sizes"], count)
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
                        sampler="reference", eta=d["ddim_sampling_eta"],
                        loss_type=d["loss_type"], p2_loss_weight_gamma=gammas[i], p2_loss_weight_k=d["p2_loss_weight_k"])
                   for i in range(count)],
        image_cond_drop_prob=d["image_cond_drop_prob"], text_cond_drop_prob=d["text_cond_drop_prob"],
        unconditional=d["unconditional"], lowres_sample_noise=d["lowres_noise_sample_level"],
        lowres_blur_prob=d["blur_prob"] if any(blur_flags[1:]) else 0.0,
        lowres_blur_sigma=tuple(sigma) if isinstance(sigma, (list, tuple)) else (sigma, sigma),
        dynamic_threshold_percentile=d["dynamic_thres_percentile"] if d["use_dynamic_thres"] else None,
        learned_variance=tuple(learned), vb_loss_weight=d["vb_loss_weight"], guidance_on_variance=True,
        random_crop_sizes=tuple(crops) if any(size is not None for size in crops) else None,
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
        **{k: (tuple(u[k]) if isinstance(u[k], list) else u[k]) for k in SAME_UNET_OPTIONS},
    )


# ---- configs: ours -> theirs ---------------------------------------------------------------------


def reference_only(kind: str, arch: str) -> None:
    if arch != "reference":
        raise UnsupportedOption(f"the {kind} uses the compact architecture, which DALLE2-pytorch has no equivalent of: "
                                "only reference-architecture models export")


def prior_config_to_theirs(config: PriorConfig) -> dict:
    """The `prior` section of their config file for one of our reference-architecture priors."""
    net, diffusion = config.net, config.diffusion
    reference_only("prior", net.arch)
    if config.predict != "x0":
        _refuse("prior", "predict", config.predict, "their sampler clamps an eps- or v-prior's x0 to [-1, 1]")
    if diffusion.p2_loss_weight_gamma:
        _refuse("prior.diffusion", "p2_loss_weight_gamma", diffusion.p2_loss_weight_gamma, "their prior has none")
    if diffusion.sample_timesteps and (diffusion.sampler != "reference" or diffusion.eta != 1.0):
        log.info("their prior samples its %d steps with its own DDIM at eta 1, not %s at eta %g: samples will differ",
                 diffusion.sample_timesteps, diffusion.sampler, diffusion.eta)
    their_net = {k: getattr(net, k) for k in ("max_text_len", *SAME_NET_OPTIONS)}
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
        reference_only(f"decoder's unet {i + 1}", u.arch)
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
            **{k: (list(getattr(u, k)) if isinstance(getattr(u, k), tuple) else getattr(u, k))
               for k in SAME_UNET_OPTIONS}))
    if any(config.learned_variance_flags()) and not config.guidance_on_variance:
        log.info("their decoder guides the learned variance too (guidance_on_variance is off here): guided samples "
                 "will differ")
    etas = {d.eta for d in diffusions if d.sample_timesteps}
    if len(etas) > 1 or any(d.sampler != "reference" for d in diffusions if d.sample_timesteps):
        log.info("their decoder samples every unet with its own DDIM at one eta (%s here): samples will differ",
                 sorted(etas))
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
        ddim_sampling_eta=diffusions[0].eta,
        random_crop_sizes=list(config.random_crop_sizes) if config.random_crop_sizes else None,
    )


def read_their_config(path: Union[str, Path]) -> dict:
    """Their JSON config file at a local path or any fsspec URL (a TrainDiffusionPriorConfig / TrainDecoderConfig, or
    just its prior / decoder part)."""
    import json

    from ..checkpoint import read_bytes

    try:
        config = json.loads(read_bytes(str(path)))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a DALLE2-pytorch config is a JSON object")
    return config
