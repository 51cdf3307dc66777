"""Typed configs of the models (the trainers' are in trainer_config.py), and the registry of named architectures.

Every model is built from one of these configs (or from keyword arguments that become one), so a
checkpoint can store its config and refuse to load into a model whose config differs. Named
architectures are small YAML files under `dalle2/model_configs/<kind>/<name>.yaml`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, \
    field_validator, model_validator


class StrictModel(BaseModel):
    """Base of every config: unknown fields are errors, so typos are caught at start; so are inf and nan
    (pydantic lets `.inf` through PositiveFloat: download.max_image_area=.inf was an OverflowError in every shard)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class DiffusionConfig(StrictModel):
    """The noise process shared by prior and decoder stages."""

    timesteps: int = 1000
    sample_timesteps: Optional[int] = None  # None: DDPM over all steps; a number: `sampler` over that many
    # with sample_timesteps: "ddim" (eta's noise), "ddpm" over the respaced process (uses a learned variance),
    # "dpmpp" (DPM-Solver++(2M): deterministic, second order, for few steps), or "reference": DALLE2-pytorch's own
    # DDIM loop for the prior or the decoder (reference_sampling.py), as imported models sampled there
    sampler: Literal["ddim", "ddpm", "dpmpp", "reference"] = "ddim"
    eta: float = Field(default=0.0, ge=0, le=1)  # DDIM's noise where sample() is given no eta (theirs: 1 for the prior)
    beta_schedule: Literal["cosine", "linear"] = "cosine"
    loss_type: Literal["l1", "l2", "huber"] = "l2"
    p2_loss_weight_gamma: NonNegativeFloat = 0.0
    p2_loss_weight_k: PositiveFloat = 1.0

    @model_validator(mode="after")
    def _check_steps(self) -> "DiffusionConfig":
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.sample_timesteps is not None and not 1 <= self.sample_timesteps <= self.timesteps:
            raise ValueError(f"sample_timesteps must be in [1, timesteps={self.timesteps}], got {self.sample_timesteps}")
        from .schedules import signal_left  # a schedule that never reaches noise is refused here, at load

        left = signal_left(self.beta_schedule, self.timesteps)
        if left > 0.01:
            raise ValueError(f"a {self.beta_schedule} schedule of {self.timesteps} timesteps keeps {left:.0%} of the "
                             "signal at its last step: use more timesteps")
        return self


Arch = Literal["compact", "reference"]


def _refuse_other_arch(config: StrictModel, fields: tuple[str, ...], arch: str) -> None:
    """Settings of the other architecture are refused by name, never silently ignored (their defaults pass: a saved
    config lists every field)."""
    wrong = sorted(f for f in fields if getattr(config, f) != type(config).model_fields[f].default)
    if wrong:
        raise ValueError(f"{', '.join(wrong)} only exist{'s' if len(wrong) == 1 else ''} in the "
                         f"{'reference' if arch == 'compact' else 'compact'} architecture, but arch is {arch!r}")


class PriorNetworkConfig(StrictModel):
    """The causal transformer that denoises image embeddings.

    `arch`: "compact" (this project's network, prior.py) or "reference" (DALLE2-pytorch's, reference_prior.py, whose
    and LAION's checkpoints import; its options follow)."""

    arch: Arch = "compact"
    dim: PositiveInt = 512
    depth: PositiveInt = 6
    heads: PositiveInt = 8
    dim_head: PositiveInt = 64
    ff_mult: PositiveInt = 4
    dropout: float = Field(default=0.0, ge=0, lt=1)  # compact only: attention and feed-forward
    embed_dim: Optional[PositiveInt] = None  # CLIP embedding width; None means `dim`
    text_encoding_dim: Optional[PositiveInt] = None  # CLIP text token width; None means `embed_dim`
    max_text_len: PositiveInt = 77
    # reference only
    attn_dropout: float = Field(default=0.0, ge=0, lt=1)
    ff_dropout: float = Field(default=0.0, ge=0, lt=1)
    normformer: bool = False  # a norm after the feed-forward's gate (NormFormer)
    rotary_emb: bool = True  # rotary positions on queries and keys
    norm_in: bool = False
    norm_out: bool = True
    final_proj: bool = True
    num_timesteps: Optional[PositiveInt] = None  # a learned embedding per step; None: sinusoidal features and an MLP
    num_time_embeds: PositiveInt = 1
    num_image_embeds: PositiveInt = 1
    num_text_embeds: PositiveInt = 1

    REFERENCE_ONLY: ClassVar[tuple[str, ...]] = ("attn_dropout", "ff_dropout", "normformer", "rotary_emb", "norm_in", "norm_out", "final_proj",
                      "num_timesteps", "num_time_embeds", "num_image_embeds", "num_text_embeds")

    @model_validator(mode="after")
    def _check_arch(self) -> "PriorNetworkConfig":
        if self.arch == "compact":
            _refuse_other_arch(self, self.REFERENCE_ONLY, self.arch)
            return self
        _refuse_other_arch(self, ("dropout",), self.arch)
        for name in ("embed_dim", "text_encoding_dim"):
            value = getattr(self, name)
            if value is not None and value != self.dim:  # their network has no input projections
                raise ValueError(f"{name} ({value}) must equal dim ({self.dim}) in the reference architecture")
        return self

    @property
    def resolved_embed_dim(self) -> int:
        return self.embed_dim or self.dim

    @property
    def resolved_text_encoding_dim(self) -> int:
        return self.text_encoding_dim or self.resolved_embed_dim


class PriorConfig(StrictModel):
    """The diffusion prior: text embedding -> image embedding."""

    net: PriorNetworkConfig = PriorNetworkConfig()
    image_embed_dim: Optional[int] = None  # None: the network's embed_dim
    predict: Literal["x0", "eps", "v"] = "x0"
    cond_drop_prob: float = 0.2
    condition_on_text_encodings: bool = False
    sampling_clamp_l2norm: bool = False  # project predicted x0 back onto the sphere while sampling
    num_samples_per_batch: PositiveInt = 2  # candidates per text at sampling; the closest to the text wins
    diffusion: DiffusionConfig = DiffusionConfig(timesteps=100, sample_timesteps=64)

    @model_validator(mode="after")
    def _check_dims(self) -> "PriorConfig":
        net_dim = self.net.resolved_embed_dim
        if self.image_embed_dim is not None and self.image_embed_dim != net_dim:
            raise ValueError(
                f"image_embed_dim ({self.image_embed_dim}) must equal net.embed_dim ({net_dim}); set net.embed_dim"
            )
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        return self


class UnetConfig(StrictModel):
    """One U-Net of the decoder cascade."""

    dim: PositiveInt = 64
    dim_mults: tuple[PositiveInt, ...] = (1, 2, 4, 8)
    num_resnet_blocks: Union[int, tuple[int, ...]] = 2
    # one flag per level, or one for all; None: only at the lowest resolution
    layer_attns: Union[bool, tuple[bool, ...], None] = None
    layer_cross_attns: Union[bool, tuple[bool, ...], None] = None
    channels: PositiveInt = 3
    image_embed_dim: PositiveInt = 512
    num_image_tokens: PositiveInt = 4
    cond_dim: Optional[PositiveInt] = None  # width of the cross-attention context; None means `dim`
    cond_on_text_encodings: bool = False
    text_encoding_dim: Optional[PositiveInt] = None  # None means image_embed_dim
    max_text_len: PositiveInt = 77
    lowres_cond: bool = False
    learned_variance: bool = False  # twice the output channels: the prediction, then the variance interpolation
    attn_heads: PositiveInt = 4
    attn_dim_head: PositiveInt = 32
    groups: PositiveInt = 8
    # "compact": this project's unet (unet.py); "reference": DALLE2-pytorch's (reference_unet.py), whose and LAION's
    # checkpoints import, with the options below. Its cross-attention (8 heads of 64) sits in every resnet block but
    # the outermost level's, so layer_cross_attns is compact only; layer_attns is its `self_attn`.
    arch: Arch = "compact"
    cond_on_image_embeds: bool = True  # theirs: only the first unet of a cascade sees the image embed
    add_image_embeds_to_time: bool = True
    lowres_noise_cond: bool = False  # the upsampler's time embedding includes its low-res input's noise level
    num_time_tokens: PositiveInt = 2
    init_dim: Optional[PositiveInt] = None
    init_cross_embed: bool = True  # a first layer of 3, 7 and 15 px convolutions side by side
    init_cross_embed_kernel_sizes: tuple[PositiveInt, ...] = (3, 7, 15)
    init_conv_kernel_size: PositiveInt = 7
    sparse_attn: bool = False  # linear attention at the levels without self-attention
    memory_efficient: bool = False  # downsample before each level's blocks, not after
    cross_embed_downsample: bool = False
    cross_embed_downsample_kernel_sizes: tuple[PositiveInt, ...] = (2, 4)
    pixel_shuffle_upsample: bool = True
    scale_skip_connection: bool = False
    resnet_weight_standardization: bool = False
    cosine_sim_cross_attn: bool = False
    cosine_sim_self_attn: bool = False
    final_conv_kernel_size: PositiveInt = 1

    REFERENCE_ONLY: ClassVar[tuple[str, ...]] = ("cond_on_image_embeds", "add_image_embeds_to_time", "lowres_noise_cond", "num_time_tokens",
                      "init_dim", "init_cross_embed", "init_cross_embed_kernel_sizes", "init_conv_kernel_size",
                      "sparse_attn", "memory_efficient", "cross_embed_downsample", "cross_embed_downsample_kernel_sizes",
                      "pixel_shuffle_upsample", "scale_skip_connection", "resnet_weight_standardization",
                      "cosine_sim_cross_attn", "cosine_sim_self_attn", "final_conv_kernel_size")

    @model_validator(mode="after")
    def _check_levels(self) -> "UnetConfig":
        _refuse_other_arch(self, self.REFERENCE_ONLY if self.arch == "compact" else ("layer_cross_attns",), self.arch)
        if self.arch == "reference" and self.cond_on_image_embeds and (self.cond_dim or self.dim) == self.image_embed_dim:
            raise ValueError(f"image_embed_dim equals cond_dim ({self.image_embed_dim}): DALLE2-pytorch's unet then "
                             "skips the projection of the image embed to tokens and cannot run; pick another cond_dim")
        for name in ("init_cross_embed_kernel_sizes", "cross_embed_downsample_kernel_sizes"):
            sizes, stride = getattr(self, name), 1 if name.startswith("init") else 2
            if any(k % 2 != stride % 2 for k in sizes):
                raise ValueError(f"{name} {sizes} must all be {'odd' if stride == 1 else 'even'}")
        levels = len(self.dim_mults)
        for name in ("num_resnet_blocks", "layer_attns", "layer_cross_attns"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ValueError(f"{name} has {len(value)} entries but dim_mults has {levels}")
        for mult in self.dim_mults:
            if (self.dim * mult) % self.groups:
                raise ValueError(f"dim*dim_mult ({self.dim * mult}) must be divisible by groups ({self.groups})")
        return self

    @property
    def downscale(self) -> int:
        """The factor the unet shrinks an image by at its lowest level: image sides must be multiples of it."""
        levels = len(self.dim_mults)
        if self.arch == "reference":  # memory-efficient levels downsample before their blocks, the first one too
            return 2 ** (levels - (0 if self.memory_efficient else 1))
        return 2 ** (levels - 1)

    def per_level(self, name: str) -> tuple:
        """A per-level setting expanded to one entry per resolution."""
        value, levels = getattr(self, name), len(self.dim_mults)
        if value is None:
            return (False,) * (levels - 1) + (True,)
        return value if isinstance(value, tuple) else (value,) * levels


class DecoderConfig(StrictModel):
    """A cascade of U-Nets from low to high resolution."""

    unets: list[UnetConfig] = [UnetConfig()]
    image_sizes: tuple[PositiveInt, ...] = (64,)
    channels: PositiveInt = 3
    predict: Literal["eps", "x0", "v"] = "eps"
    diffusion: Union[DiffusionConfig, list[DiffusionConfig]] = DiffusionConfig()
    image_cond_drop_prob: float = Field(default=0.1, ge=0, lt=1)
    text_cond_drop_prob: float = Field(default=0.5, ge=0, lt=1)
    unconditional: bool = False
    lowres_noise_max: float = Field(default=0.2, ge=0, le=1)  # highest noise level (fraction of timesteps) used to augment the low-res input
    lowres_blur_sigma: tuple[PositiveFloat, PositiveFloat] = (0.4, 0.6)  # drawn per sample, at the low resolution
    lowres_blur_prob: float = Field(default=0.5, ge=0, le=1)  # the share of training samples blurred
    lowres_sample_noise: float = Field(default=0.1, ge=0, le=1)  # fixed noise level (fraction of timesteps) of the low-res input at sampling
    # Imagen's dynamic thresholding of x0 while sampling (this quantile of |x0| per sample); None: clamp to [-1, 1]
    dynamic_threshold_percentile: Optional[float] = Field(default=0.95, gt=0, le=1)
    # learned reverse-process variances (improved DDPM): one flag per unet, or one for the first unet only. Off by
    # default: on the demo it matched no prompt better and ranked captions worse in every seed (bench/learned_variance)
    learned_variance: Union[bool, tuple[bool, ...]] = False
    vb_loss_weight: float = Field(default=0.001, ge=0)  # the variational bound's weight next to the simple loss
    # classifier-free guidance moves the learned variance channels too, as DALLE2-pytorch does (its imported decoders
    # keep that); off: only the prediction is guided and the variance is the conditional one
    guidance_on_variance: bool = False
    # upsamplers train on random crops of this side (the low-res input cropped alike) and sample at full size, as
    # DALLE2-pytorch and Imagen train their big upsamplers: one entry per unet, None for the first and uncropped ones
    random_crop_sizes: Optional[tuple[Optional[PositiveInt], ...]] = None

    @field_validator("image_sizes", mode="before")
    @classmethod
    def _sizes_to_tuple(cls, value: Any) -> Any:
        return (value,) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _check_cascade(self) -> "DecoderConfig":
        if len(self.image_sizes) != len(self.unets):
            raise ValueError(f"image_sizes has {len(self.image_sizes)} entries but there are {len(self.unets)} unets")
        if list(self.image_sizes) != sorted(set(self.image_sizes)):
            raise ValueError(f"image_sizes must be strictly ascending, got {self.image_sizes}")
        if isinstance(self.diffusion, list) and len(self.diffusion) != len(self.unets):
            raise ValueError(f"diffusion has {len(self.diffusion)} entries but there are {len(self.unets)} unets")
        for i, unet in enumerate(self.unets):
            if unet.lowres_cond != (i > 0):
                raise ValueError(f"unets[{i}].lowres_cond must be {i > 0}: only upsampler stages take a low-res image")
        crops = self.random_crop_sizes
        if crops is not None:
            if len(crops) != len(self.unets):
                raise ValueError(f"random_crop_sizes has {len(crops)} entries but there are {len(self.unets)} unets")
            if crops[0] is not None:
                raise ValueError("random_crop_sizes[0] must be None: the first unet sees whole images (crop upsamplers)")
            for i, (crop, size, unet) in enumerate(zip(crops, self.image_sizes, self.unets)):
                if crop is not None and (crop >= size or crop % unet.downscale):
                    raise ValueError(f"random_crop_sizes[{i}]={crop} must be smaller than image_sizes[{i}]={size} and "
                                     f"a multiple of {unet.downscale} (unets[{i}] halves it {unet.downscale.bit_length() - 1} times)")
        flags = self.learned_variance_flags()
        if len(flags) != len(self.unets):
            raise ValueError(f"learned_variance has {len(flags)} entries but there are {len(self.unets)} unets")
        # A unet's own setting wins; the decoder's fills in the unets that leave it unset. Both set and different
        # is a conflict: which one the user meant cannot be guessed.
        decoder_set, unets = "learned_variance" in self.model_fields_set, []
        for i, (unet, flag) in enumerate(zip(self.unets, flags)):
            if "learned_variance" not in unet.model_fields_set:
                unet = unet.model_copy(update={"learned_variance": flag})
            elif decoder_set and unet.learned_variance != flag:
                raise ValueError(f"unets[{i}].learned_variance is {unet.learned_variance} but learned_variance="
                                 f"{self.learned_variance!r} gives unet {i + 1} {flag}: set one of them")
            unets.append(unet)
        self.unets = unets
        resolved = tuple(u.learned_variance for u in unets)
        if resolved != flags:  # said once, in the decoder's field too, so a saved config reads back the same
            self.learned_variance = resolved
        return self

    def learned_variance_flags(self) -> tuple[bool, ...]:
        """One flag per unet: a single True means the first unet only, as lucidrains' Decoder reads it."""
        if isinstance(self.learned_variance, bool):
            return (self.learned_variance,) + (False,) * (len(self.unets) - 1)
        return tuple(self.learned_variance)

    def diffusion_for(self, index: int) -> DiffusionConfig:
        """The diffusion settings of unet `index` (one shared, or one per unet)."""
        return self.diffusion[index] if isinstance(self.diffusion, list) else self.diffusion


DIFFUSION_FIELDS = tuple(DiffusionConfig.model_fields)


def with_diffusion_kwargs(config_cls: type[StrictModel], kwargs: dict) -> dict:
    """Fold flat diffusion keywords (`timesteps=100`, as lucidrains' API takes them) into `diffusion`."""
    fields = {k: v for k, v in kwargs.items() if k not in DIFFUSION_FIELDS}
    flat = {k: v for k, v in kwargs.items() if k in DIFFUSION_FIELDS}
    if flat:
        base = config_cls.model_fields["diffusion"].default
        base = base.model_dump() if isinstance(base, DiffusionConfig) else {}
        if "timesteps" in flat and "sample_timesteps" not in flat:
            base["sample_timesteps"] = None  # the default step count may not fit the new schedule
        per_unet = [len(v) for v in flat.values() if isinstance(v, (list, tuple))]
        if per_unet:  # one value per unet, as `sample_timesteps=(250, 27)` in lucidrains' API
            fields["diffusion"] = [{**base, **{k: v[i] if isinstance(v, (list, tuple)) else v for k, v in flat.items()}}
                                   for i in range(per_unet[0])]
        else:
            fields["diffusion"] = {**base, **flat}
    return fields


def config_diff(saved: Any, current: Any, path: str = "") -> list[str]:
    """Fields whose values differ between two configs (dicts and lists, nested), as 'path: saved, current'."""
    if isinstance(saved, dict) and isinstance(current, dict):
        diffs = []
        for key in sorted(set(saved) | set(current)):
            sub = f"{path}.{key}" if path else str(key)
            diffs.extend(config_diff(saved.get(key, "<missing>"), current.get(key, "<missing>"), sub))
        return diffs
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current) \
            and any(isinstance(v, dict) for v in saved):
        return [d for i, (a, b) in enumerate(zip(saved, current)) for d in config_diff(a, b, f"{path}[{i}]")]
    if _normalise(saved) != _normalise(current):
        return [f"{path}: checkpoint {saved!r}, model {current!r}"]
    return []


def _normalise(value: Any) -> Any:
    # JSON/YAML round trips turn tuples into lists; compare them as equal.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def registry_names(kind: str) -> list[str]:
    """Names of the architectures registered for `kind` ('prior', 'decoder', 'clip')."""
    folder = resources.files("dalle2") / "model_configs" / kind
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".json")))


def load_registered(kind: str, name: str) -> dict:
    """The raw dict of a registered architecture, e.g. `load_registered('prior', 'tiny')`."""
    folder = resources.files("dalle2") / "model_configs" / kind
    for suffix in (".yaml", ".json"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return yaml.safe_load(path.read_text())
    raise KeyError(f"no {kind} architecture named {name!r}; registered: {registry_names(kind)}")


def resolve(config_cls: type[StrictModel], value: Union[str, dict, StrictModel, None], kind: str) -> StrictModel:
    """A config from a registered name, a dict (optionally with `base: <name>` to extend one) or an instance."""
    if value is None:
        return config_cls()
    if isinstance(value, config_cls):
        return value
    if isinstance(value, str):
        return config_cls(**load_registered(kind, value))
    value = dict(value)
    base = value.pop("base", None)
    merged = _deep_merge(load_registered(kind, base), value) if base else value
    return config_cls(**merged)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, val in override.items():
        out[key] = _deep_merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else val
    return out
