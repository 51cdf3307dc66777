"""The prior network in the reference architecture: DALLE2-pytorch's DiffusionPriorNetwork, whose checkpoints import.

The sequence is [text encodings (padded to max_text_len), text embed(s), time embed(s), noised image embed(s),
learned query]; a causal transformer with a null key reads the prediction off the query. It differs from the compact
network (`prior.py`) where LAION's priors need it: one shared key/value head, cosine-similarity attention, rotary and
T5 relative positions, NormFormer's extra norm, and a learned null for the noised image embed too, which dropped
conditioning replaces along with the text.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from .configs import PriorNetworkConfig
from .layers import Checkpointable
from .reference_layers import GainLayerNorm, NullKeyAttention, RelativePositionBias, RotaryEmbedding, \
    SinusoidalEmbedding, TimeMLP, feed_forward, pad_text, text_mask_of


class CausalTransformer(Checkpointable, nn.Module):
    """Pre-norm causal transformer blocks, a stable final norm and a final projection."""

    def __init__(self, c: PriorNetworkConfig):
        super().__init__()
        dim = c.dim
        self.init_norm = GainLayerNorm(dim) if c.norm_in else nn.Identity()
        self.rel_pos_bias = RelativePositionBias(heads=c.heads)
        rotary = RotaryEmbedding(min(32, c.dim_head)) if c.rotary_emb else None
        self.layers = nn.ModuleList(
            nn.ModuleList([
                NullKeyAttention(dim, heads=c.heads, dim_head=c.dim_head, dropout=c.attn_dropout, rotary=rotary, causal=True),
                feed_forward(dim, mult=c.ff_mult, dropout=c.ff_dropout, post_activation_norm=c.normformer),
            ])
            for _ in range(c.depth)
        )
        self.norm = GainLayerNorm(dim, stable=True) if c.norm_out else nn.Identity()
        self.project_out = nn.Linear(dim, dim, bias=False) if c.final_proj else nn.Identity()

    @staticmethod
    def layer(attention: nn.Module, ff: nn.Module, x: Tensor, bias: Tensor) -> Tensor:
        x = attention(x, bias) + x
        return ff(x) + x

    def forward(self, x: Tensor) -> Tensor:
        x = self.init_norm(x)
        bias = self.rel_pos_bias(x.shape[1], x.shape[1] + 1, device=x.device)  # one more key: the null key
        for attention, ff in self.layers:
            x = self.checkpointed(self.layer, attention, ff, x, bias)
        return self.project_out(self.norm(x))


class ReferencePriorNetwork(nn.Module):
    """DALLE2-pytorch's prior network; same call as `prior.DiffusionPriorNetwork`."""

    def __init__(self, config: PriorNetworkConfig):
        super().__init__()
        c = self.config = config
        dim = c.dim
        self.to_text_embeds = nn.Sequential(
            nn.Linear(dim, dim * c.num_text_embeds) if c.num_text_embeds > 1 else nn.Identity(),
            Rearrange("b (n d) -> b n d", n=c.num_text_embeds),
        )
        # a learned embedding per training step (LAION's priors), or sinusoidal features through an MLP
        time_embedding = nn.Embedding(c.num_timesteps, dim * c.num_time_embeds) if c.num_timesteps else \
            nn.Sequential(SinusoidalEmbedding(dim), TimeMLP(dim, dim * c.num_time_embeds))
        self.to_time_embeds = nn.Sequential(time_embedding, Rearrange("b (n d) -> b n d", n=c.num_time_embeds))
        self.to_image_embeds = nn.Sequential(
            nn.Linear(dim, dim * c.num_image_embeds) if c.num_image_embeds > 1 else nn.Identity(),
            Rearrange("b (n d) -> b n d", n=c.num_image_embeds),
        )
        self.learned_query = nn.Parameter(torch.randn(dim))
        self.causal_transformer = CausalTransformer(c)
        self.null_text_encodings = nn.Parameter(torch.randn(1, c.max_text_len, dim))
        self.null_text_embeds = nn.Parameter(torch.randn(1, c.num_text_embeds, dim))
        self.null_image_embed = nn.Parameter(torch.randn(1, dim))

    def forward(
        self,
        image_embed: Tensor,
        t: Tensor,
        text_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        cond_drop_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Predict from a noised `image_embed` [B, D] at steps `t` [B]; `cond_drop_mask` [B] True drops the text and
        the image embed (their classifier-free guidance drops both). Without `text_mask`, encodings that are all zero
        are padding, as theirs reads them."""
        batch, dim = image_embed.shape
        c = self.config
        keep = torch.ones(batch, dtype=torch.bool, device=image_embed.device) if cond_drop_mask is None \
            else ~cond_drop_mask
        keep = rearrange(keep, "b -> b 1 1")

        text_embed = self.to_text_embeds(text_embed)
        image_embed = self.to_image_embeds(image_embed)
        if text_encodings is None:
            text_encodings = torch.empty((batch, 0, dim), device=image_embed.device, dtype=image_embed.dtype)
        # padded to max_text_len, padding then replaced by learned tokens, one per position
        text_encodings, mask = pad_text(text_encodings, text_mask_of(text_encodings, text_mask, c.max_text_len),
                                        c.max_text_len)
        text_encodings = torch.where(mask[..., None] & keep, text_encodings, self.null_text_encodings.to(text_encodings.dtype))
        text_embed = torch.where(keep, text_embed, self.null_text_embeds.to(text_embed.dtype))
        image_embed = torch.where(keep, image_embed, self.null_image_embed.to(image_embed.dtype))

        time_embed = self.to_time_embeds(t if c.num_timesteps else t.type(image_embed.dtype))
        query = repeat(self.learned_query, "d -> b 1 d", b=batch)
        tokens = torch.cat((text_encodings, text_embed, time_embed, image_embed, query), dim=-2)
        return self.causal_transformer(tokens)[..., -1, :]
