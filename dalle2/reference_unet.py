"""The unet in the reference architecture: DALLE2-pytorch's Unet, whose checkpoints (LAION's decoders) import.

Conditioning as theirs: the time embedding becomes a vector (added to by the image embed) and a few tokens; with the
image tokens they are the cross-attention context of every resnet block but the outermost level, and the text tokens
join them only in the middle blocks. Self-attention (or linear attention, `sparse_attn`) follows each level's resnet
blocks. `memory_efficient` downsamples before a level's blocks instead of after. Same call as `unet.Unet`.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from .configs import UnetConfig
from .layers import Checkpointable
from .unet import check_inputs
from .reference_layers import CrossEmbedLayer, LinearAttention, NullKeyAttention, OnPixels, PixelShuffleUpsample, \
    Residual, ResnetBlock, SinusoidalEmbedding, downsample, nearest_upsample, pad_text, text_mask_of


class ReferenceUnet(Checkpointable, nn.Module):
    """DALLE2-pytorch's Unet with this project's call signature."""

    def __init__(self, config: UnetConfig):
        super().__init__()
        c = self.config = config
        dim, levels = c.dim, len(c.dim_mults)
        init_dim = c.init_dim or dim
        cond_dim, time_cond_dim = c.cond_dim or dim, dim * 4
        in_channels = c.channels * (2 if c.lowres_cond else 1)
        self.init_conv = CrossEmbedLayer(in_channels, c.init_cross_embed_kernel_sizes, dim_out=init_dim, stride=1) \
            if c.init_cross_embed else nn.Conv2d(in_channels, init_dim, c.init_conv_kernel_size,
                                                 padding=c.init_conv_kernel_size // 2)
        dims = [init_dim, *(dim * m for m in c.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))

        self.to_time_hiddens = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, time_cond_dim), nn.GELU())
        self.to_time_tokens = nn.Sequential(nn.Linear(time_cond_dim, cond_dim * c.num_time_tokens),
                                            Rearrange("b (r d) -> b r d", r=c.num_time_tokens))
        self.to_time_cond = nn.Sequential(nn.Linear(time_cond_dim, time_cond_dim))
        self.image_to_tokens = nn.Sequential(nn.Linear(c.image_embed_dim, cond_dim * c.num_image_tokens),
                                             Rearrange("b (n d) -> b n d", n=c.num_image_tokens)) \
            if c.cond_on_image_embeds else nn.Identity()
        self.to_image_hiddens = nn.Sequential(nn.Linear(c.image_embed_dim, time_cond_dim), nn.GELU()) \
            if c.cond_on_image_embeds and c.add_image_embeds_to_time else None
        self.norm_cond, self.norm_mid_cond = nn.LayerNorm(cond_dim), nn.LayerNorm(cond_dim)
        self.text_to_cond = nn.Linear(c.text_encoding_dim or c.image_embed_dim, cond_dim) \
            if c.cond_on_text_encodings else None
        self.to_lowres_noise_cond = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, time_cond_dim), nn.GELU(),
                                                  nn.Linear(time_cond_dim, time_cond_dim)) if c.lowres_noise_cond else None
        # learned stand-ins for dropped conditioning (classifier-free guidance) and padded text
        self.null_image_embed = nn.Parameter(torch.randn(1, c.num_image_tokens, cond_dim))
        self.null_image_hiddens = nn.Parameter(torch.randn(1, time_cond_dim))
        self.null_text_embed = nn.Parameter(torch.randn(1, c.max_text_len, cond_dim))
        self.skip_connect_scale = 2**-0.5 if c.scale_skip_connection else 1.0

        def resnet(d_in: int, d_out: int, cond: Optional[int] = None) -> ResnetBlock:
            return ResnetBlock(d_in, d_out, time_cond_dim=time_cond_dim, groups=c.groups, cond_dim=cond,
                               weight_standardization=c.resnet_weight_standardization,
                               cosine_sim_cross_attn=c.cosine_sim_cross_attn)

        def attention(d: int, self_attn: bool) -> nn.Module:
            if self_attn:
                return OnPixels(Residual(NullKeyAttention(d, heads=c.attn_heads, dim_head=c.attn_dim_head,
                                                          cosine_sim=c.cosine_sim_self_attn)))
            if c.sparse_attn:
                return Residual(LinearAttention(d, heads=c.attn_heads, dim_head=c.attn_dim_head))
            return nn.Identity()

        def down(d_in: int, d_out: int) -> nn.Module:
            if c.cross_embed_downsample:
                return CrossEmbedLayer(d_in, c.cross_embed_downsample_kernel_sizes, dim_out=d_out, stride=2)
            return downsample(d_in, d_out)

        up = PixelShuffleUpsample if c.pixel_shuffle_upsample else nearest_upsample
        blocks, self_attns = c.per_level("num_resnet_blocks"), c.per_level("layer_attns")
        self.init_resnet_block = resnet(init_dim, init_dim) if c.memory_efficient else None
        self.downs, self.ups, skip_dims = nn.ModuleList(), nn.ModuleList(), []
        for i, (d_in, d_out) in enumerate(in_out):
            first, last = i == 0, i == levels - 1
            d_layer = d_out if c.memory_efficient else d_in
            skip_dims.append(d_layer)
            self.downs.append(nn.ModuleList([
                down(d_in, d_out) if c.memory_efficient else None,
                resnet(d_layer, d_layer),
                nn.ModuleList(resnet(d_layer, d_layer, None if first else cond_dim) for _ in range(blocks[i])),
                attention(d_layer, self_attns[i]),
                down(d_layer, d_out) if not last and not c.memory_efficient else nn.Conv2d(d_layer, d_out, 1),
            ]))
        mid = dims[-1]
        self.mid_block1 = resnet(mid, mid, cond_dim)
        self.mid_attn = attention(mid, True)
        self.mid_block2 = resnet(mid, mid, cond_dim)
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == levels - 1
            skip = skip_dims.pop()
            cond = None if last else cond_dim
            self.ups.append(nn.ModuleList([
                resnet(d_out + skip, d_out, cond),
                nn.ModuleList(resnet(d_out + skip, d_out, cond) for _ in range(blocks[levels - 1 - i])),
                attention(d_out, self_attns[levels - 1 - i]),
                up(d_out, d_in) if not last or c.memory_efficient else nn.Identity(),
            ]))
        self.final_resnet_block = resnet(dim * 2, dim)
        out_channels = c.channels * (2 if c.learned_variance else 1)
        self.to_out = nn.Conv2d(dim + (c.channels if c.lowres_cond else 0), out_channels, c.final_conv_kernel_size,
                                padding=c.final_conv_kernel_size // 2)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        self.downscale = c.downscale

    def conditioning(self, x: Tensor, t: Tensor, image_embed: Optional[Tensor], text_encodings: Optional[Tensor],
                     text_mask: Optional[Tensor], image_keep: Tensor, text_keep: Tensor,
                     lowres_noise_times: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(time vector, context tokens of the outer levels, context tokens of the middle)."""
        c = self.config
        time_hiddens = self.to_time_hiddens(t.type_as(x))
        time_tokens, time_cond = self.to_time_tokens(time_hiddens), self.to_time_cond(time_hiddens)
        if lowres_noise_times is not None and self.to_lowres_noise_cond is not None:
            time_cond = time_cond + self.to_lowres_noise_cond(lowres_noise_times.type_as(x))
        if image_embed is not None and self.to_image_hiddens is not None:
            hiddens = self.to_image_hiddens(image_embed)
            time_cond = time_cond + torch.where(image_keep[:, None], hiddens, self.null_image_hiddens.to(hiddens.dtype))
        tokens = time_tokens
        if c.cond_on_image_embeds:
            if image_embed is None:
                raise ValueError("this unet conditions on image embeds: pass image_embed")
            image_tokens = self.image_to_tokens(image_embed)
            image_tokens = torch.where(image_keep[:, None, None], image_tokens, self.null_image_embed.to(image_tokens.dtype))
            tokens = torch.cat((tokens, image_tokens), dim=-2)
        mid_tokens = tokens
        if text_encodings is not None and self.text_to_cond is not None:
            mask = text_mask_of(text_encodings, text_mask, c.max_text_len)
            # projected, then padded (theirs: the padding is zeros, not the projection's bias)
            text_tokens, mask = pad_text(self.text_to_cond(text_encodings), mask, c.max_text_len)
            keep = mask[..., None] & text_keep[:, None, None]
            text_tokens = torch.where(keep, text_tokens, self.null_text_embed.to(text_tokens.dtype))
            mid_tokens = torch.cat((tokens, text_tokens), dim=-2)
        return time_cond, self.norm_cond(tokens), self.norm_mid_cond(mid_tokens)

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
        image_keep = ~(no_drop if image_drop is None else image_drop)
        text_keep = ~(no_drop if text_drop is None else text_drop)
        if lowres_cond_img is not None:
            x = torch.cat((x, lowres_cond_img), dim=1)
        x = self.init_conv(x)
        residual = x.clone()
        t, cond, mid_cond = self.conditioning(x, t, image_embed, text_encodings, text_mask, image_keep, text_keep,
                                              lowres_noise_times)
        if self.init_resnet_block is not None:
            x = self.init_resnet_block(x, t)

        skips = []
        for pre_downsample, init_block, resnets, attention, post_downsample in self.downs:
            if pre_downsample is not None:
                x = pre_downsample(x)
            x = self.checkpointed(init_block, x, t, cond)
            for block in resnets:
                x = self.checkpointed(block, x, t, cond)
                skips.append(x)
            x = self.checkpointed(attention, x)
            skips.append(x)
            if post_downsample is not None:
                x = post_downsample(x)

        x = self.checkpointed(self.mid_block1, x, t, mid_cond)
        x = self.checkpointed(self.mid_block2, self.checkpointed(self.mid_attn, x), t, mid_cond)

        for init_block, resnets, attention, upsample in self.ups:
            x = self.checkpointed(init_block, torch.cat((x, skips.pop() * self.skip_connect_scale), dim=1), t, cond)
            for block in resnets:
                x = self.checkpointed(block, torch.cat((x, skips.pop() * self.skip_connect_scale), dim=1), t, cond)
            x = upsample(self.checkpointed(attention, x))

        x = self.final_resnet_block(torch.cat((x, residual), dim=1), t)
        if lowres_cond_img is not None:
            x = torch.cat((x, lowres_cond_img), dim=1)
        return self.to_out(x)
