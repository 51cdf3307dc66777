"""The U-Net of one decoder stage: pixels (and a low-res image) in, denoising output out.

Conditioning follows DALL-E 2 (section 2.1): the CLIP image embedding is added to the timestep
embedding and also projected to a few tokens that, with the optional text encodings, form the
context of cross-attention. Upsampler stages take the low-res image concatenated to their input,
with its augmentation noise level as a second time condition.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .configs import UnetConfig
from .layers import Attention, Checkpointable, time_mlp


def check_inputs(config: UnetConfig, downscale: int, x: Tensor, lowres_cond_img: Optional[Tensor]) -> None:
    """Refuse an image size the unet cannot halve down to its lowest level, or a low-res input it does not take."""
    height, width = x.shape[-2:]
    if height % downscale or width % downscale:
        raise ValueError(f"image size {height}x{width} must be divisible by {downscale} for dim_mults {config.dim_mults}")
    if config.lowres_cond != (lowres_cond_img is not None):
        raise ValueError("lowres_cond_img must be given exactly when the unet was built with lowres_cond=True")


class ResnetBlock(nn.Module):
    """conv-norm-SiLU twice, the second norm modulated by the time embedding (scale and shift)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, dim_out)
        self.to_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, dim_out)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_cond: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        scale, shift = rearrange(self.to_scale_shift(time_cond), "b (two c) -> two b c 1 1", two=2)
        h = F.silu(self.norm2(self.conv2(h)) * (1 + scale) + shift)
        return h + self.skip(x)


class SpatialAttention(nn.Module):
    """Pre-norm attention over the pixels of a feature map: self-attention, or cross-attention to a context."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: Optional[int] = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, context_dim=context_dim)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        height = x.shape[-2]
        tokens = rearrange(x, "b c h w -> b (h w) c")
        tokens = tokens + self.attn(self.norm(tokens), context=context, mask=mask)
        return rearrange(tokens, "b (h w) c -> b c h w", h=height)


class Level(nn.Module):
    """The blocks of one resolution: resnet blocks, each followed by the level's attention layers."""

    def __init__(self, dims_in: list[int], dim_out: int, c: UnetConfig, time_dim: int, self_attn: bool, cross_attn: bool):
        super().__init__()
        cond_dim = c.cond_dim or c.dim
        self.resnets = nn.ModuleList(ResnetBlock(d, dim_out, time_dim, c.groups) for d in dims_in)
        self.self_attns = nn.ModuleList(
            SpatialAttention(dim_out, c.attn_heads, c.attn_dim_head) if self_attn else nn.Identity() for _ in dims_in
        )
        self.cross_attns = nn.ModuleList(
            SpatialAttention(dim_out, c.attn_heads, c.attn_dim_head, cond_dim) if cross_attn else nn.Identity()
            for _ in dims_in
        )

    def block(self, i: int, x: Tensor, time_cond: Tensor, context: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
        x = self.resnets[i](x, time_cond)
        if isinstance(self.self_attns[i], SpatialAttention):
            x = self.self_attns[i](x)
        if isinstance(self.cross_attns[i], SpatialAttention) and context is not None:
            x = self.cross_attns[i](x, context, mask)
        return x


def downsample(dim_in: int, dim_out: int) -> nn.Module:
    """Halve the resolution without striding: pixel-unshuffle to 4x channels, then a 1x1 conv."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim_in * 4, dim_out, 1))


class PixelShuffleUpsample(nn.Module):
    """Double the resolution with a 1x1 conv and pixel shuffle, initialised so the four sub-pixels
    start equal (ICNR, Aitken et al. 2017): no checkerboard artefacts at initialisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out * 4, 1)
        weight = torch.empty(dim_out, dim_in, 1, 1)
        nn.init.kaiming_uniform_(weight, a=5**0.5)
        with torch.no_grad():
            self.conv.weight.copy_(repeat(weight, "o i h w -> (o four) i h w", four=4))
            self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(F.silu(self.conv(x)), 2)


class Unet(Checkpointable, nn.Module):
    """One stage of the decoder cascade."""

    def __init__(self, config: Optional[UnetConfig] = None, **kwargs):
        super().__init__()
        c = self.config = config if config is not None else UnetConfig(**kwargs)
        time_dim, cond_dim = c.dim * 4, c.cond_dim or c.dim
        dims = [c.dim] + [c.dim * m for m in c.dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        blocks, self_attns, cross_attns = c.per_level("num_resnet_blocks"), c.per_level("layer_attns"), c.per_level("layer_cross_attns")

        self.init_conv = nn.Conv2d(c.channels * (2 if c.lowres_cond else 1), c.dim, 7, padding=3)
        self.to_time = time_mlp(c.dim, time_dim)
        self.to_lowres_time = time_mlp(c.dim, time_dim) if c.lowres_cond else None
        # CLIP image embed -> a vector added to the time embedding, and tokens for cross-attention.
        self.to_image_hidden = nn.Sequential(nn.Linear(c.image_embed_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.to_image_tokens = nn.Linear(c.image_embed_dim, c.num_image_tokens * cond_dim)
        self.null_image_hidden = nn.Parameter(torch.randn(time_dim) * 0.02)
        self.null_image_tokens = nn.Parameter(torch.randn(c.num_image_tokens, cond_dim) * 0.02)
        if c.cond_on_text_encodings:
            self.to_text_tokens = nn.Linear(c.text_encoding_dim or c.image_embed_dim, cond_dim)
            self.null_text_tokens = nn.Parameter(torch.randn(c.max_text_len, cond_dim) * 0.02)
        self.context_norm = nn.LayerNorm(cond_dim)

        self.downs, self.down_samples = nn.ModuleList(), nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(Level([d_in] * blocks[i], d_in, c, time_dim, self_attns[i], cross_attns[i]))
            self.down_samples.append(nn.Conv2d(d_in, d_out, 3, padding=1) if last else downsample(d_in, d_out))

        mid = dims[-1]
        self.mid = Level([mid, mid], mid, c, time_dim, self_attn=True, cross_attn=any(cross_attns))

        self.ups, self.up_samples = nn.ModuleList(), nn.ModuleList()
        for i, (d_in, d_out) in reversed(list(enumerate(in_out))):
            first = i == 0
            self.ups.append(Level([d_out + d_in] * blocks[i], d_out, c, time_dim, self_attns[i], cross_attns[i]))
            self.up_samples.append(nn.Conv2d(d_out, d_in, 3, padding=1) if first else PixelShuffleUpsample(d_out, d_in))

        self.final_block = ResnetBlock(c.dim * 2, c.dim, time_dim, c.groups)
        self.final_conv = nn.Conv2d(c.dim, c.channels * (2 if c.learned_variance else 1), 1)
        self.downscale = c.downscale

    def conditioning(
        self,
        t: Tensor,
        image_embed: Optional[Tensor],
        text_encodings: Optional[Tensor],
        text_mask: Optional[Tensor],
        image_drop: Tensor,
        text_drop: Tensor,
        lowres_noise_times: Optional[Tensor],
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The time conditioning vector and the cross-attention context with its mask."""
        c = self.config
        time_cond = self.to_time(t)
        if lowres_noise_times is not None:
            time_cond = time_cond + self.to_lowres_time(lowres_noise_times)
        if image_embed is None:  # an unconditional decoder
            return time_cond, None, None

        batch = image_embed.shape[0]
        hidden = torch.where(image_drop[:, None], self.null_image_hidden, self.to_image_hidden(image_embed))
        image_tokens = rearrange(self.to_image_tokens(image_embed), "b (n d) -> b n d", n=c.num_image_tokens)
        image_tokens = torch.where(image_drop[:, None, None], self.null_image_tokens, image_tokens)
        context, mask = [image_tokens], [torch.ones(batch, c.num_image_tokens, dtype=torch.bool, device=t.device)]
        if c.cond_on_text_encodings:
            if text_encodings is None:
                raise ValueError("this unet has cond_on_text_encodings=True: pass text_encodings (or text, with CLIP)")
            length = text_encodings.shape[1]
            if length > c.max_text_len:
                raise ValueError(f"text_encodings has {length} tokens, more than max_text_len={c.max_text_len}")
            text_tokens = torch.where(text_drop[:, None, None], self.null_text_tokens[:length], self.to_text_tokens(text_encodings))
            keep = torch.ones(batch, length, dtype=torch.bool, device=t.device) if text_mask is None else text_mask.bool()
            context.append(text_tokens)
            mask.append(keep | text_drop[:, None])
        return time_cond + hidden, self.context_norm(torch.cat(context, dim=1)), torch.cat(mask, dim=1)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        image_embed: Optional[Tensor] = None,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        lowres_cond_img: Optional[Tensor] = None,
        lowres_noise_times: Optional[Tensor] = None,
        image_drop: Optional[Tensor] = None,
        text_drop: Optional[Tensor] = None,
    ) -> Tensor:
        """Denoising output for noised images `x` [B, C, H, W] at steps `t` [B]; drop masks are [B] bools."""
        check_inputs(self.config, self.downscale, x, lowres_cond_img)
        no_drop = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        time_cond, context, mask = self.conditioning(
            t, image_embed, text_encodings, text_mask,
            no_drop if image_drop is None else image_drop, no_drop if text_drop is None else text_drop,
            lowres_noise_times,
        )
        if lowres_cond_img is not None:
            x = torch.cat([x, lowres_cond_img], dim=1)

        x = self.init_conv(x)
        residual, skips = x, []
        for level, down in zip(self.downs, self.down_samples):
            for i in range(len(level.resnets)):
                x = self.checkpointed(level.block, i, x, time_cond, context, mask)
                skips.append(x)
            x = down(x)
        for i in range(len(self.mid.resnets)):
            x = self.checkpointed(self.mid.block, i, x, time_cond, context, mask)
        for level, up in zip(self.ups, self.up_samples):
            for i in range(len(level.resnets)):
                x = self.checkpointed(level.block, i, torch.cat([x, skips.pop()], dim=1), time_cond, context, mask)
            x = up(x)
        x = self.final_block(torch.cat([x, residual], dim=1), time_cond)
        return self.final_conv(x)
