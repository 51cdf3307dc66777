"""Building blocks of the reference architecture: the layers of DALLE2-pytorch's prior and unet, as its 1.15.6 builds them.

The reference prior and unet (`reference_prior.py`, `reference_unet.py`) are made of these. Their parameter names are
DALLE2-pytorch's own (`to_q`, `null_kv`, `norm.g`, the indices of its `nn.Sequential`s), so a DALLE2-pytorch or LAION
state dict loads into them key for key, and ours exports the same way. Every operation follows the order theirs
computes in, so outputs agree to float32 round-off (tests/test_dalle2_pytorch_parity.py checks it against their outputs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .layers import l2norm


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain and no bias over the last dim (`channel_dim=-1`) or the channels of a feature map (`1`);
    `stable` divides by the (detached) largest value first, as their prior's final norm does."""

    def __init__(self, dim: int, stable: bool = False, channel_dim: int = -1):
        super().__init__()
        self.stable, self.channel_dim = stable, channel_dim
        self.g = nn.Parameter(torch.ones(dim) if channel_dim == -1 else torch.ones(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        if self.stable:
            x = x / x.amax(dim=self.channel_dim, keepdim=True).detach()
        var = torch.var(x, dim=self.channel_dim, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=self.channel_dim, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal features of a float timestep, in the input's dtype (theirs: float inputs only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -(math.log(10000) / (half - 1)))
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of the first `dim` features of queries and keys (interleaved pairs, base 10000),
    as rotary-embedding-torch applies it; `freqs` is kept as a frozen parameter because their state dicts hold it."""

    def __init__(self, dim: int):
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def rotate(self, x: Tensor) -> Tensor:
        """x: [..., N, D] with positions along dim -2."""
        positions = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        angles = repeat(positions[:, None] * self.freqs[None, :], "n f -> n (f two)", two=2)
        width = angles.shape[-1]
        rotated, rest = x[..., :width], x[..., width:]
        pairs = rearrange(rotated, "... (f two) -> ... f two", two=2)
        half_turn = rearrange(torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1), "... f two -> ... (f two)")
        rotated = rotated * angles.cos() + half_turn * angles.sin()
        return torch.cat((rotated, rest), dim=-1).type(x.dtype)


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias, one value per head (causal: only keys at or before the query count)."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def buckets(self, relative_position: Tensor) -> Tensor:
        n = (-relative_position).clamp(min=0)
        max_exact = self.num_buckets // 2
        large = max_exact + (torch.log(n.float() / max_exact) / math.log(self.max_distance / max_exact)
                             * (self.num_buckets - max_exact)).long()
        large = large.clamp(max=self.num_buckets - 1)
        return torch.where(n < max_exact, n, large)

    def forward(self, queries: int, keys: int, device: torch.device) -> Tensor:
        """[heads, queries, keys]: key j sits at position j - 1 of the queries' (key 0 is the null key)."""
        relative = torch.arange(keys, device=device)[None, :] - torch.arange(queries, device=device)[:, None]
        return rearrange(self.relative_attention_bias(self.buckets(relative)), "i j h -> h i j")


def text_mask_of(encodings: Tensor, text_mask: Optional[Tensor], max_len: int) -> Tensor:
    """Which text tokens are real: the given mask, or (theirs) the tokens that are not all zero; refuses more tokens
    than the model has learned padding for."""
    if encodings.shape[1] > max_len:
        raise ValueError(f"text_encodings has {encodings.shape[1]} tokens, more than max_text_len={max_len}")
    return torch.any(encodings != 0.0, dim=-1) if text_mask is None else text_mask.bool()


def pad_text(tokens: Tensor, mask: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Tokens [B, N, D] and mask [B, N] zero-padded to max_len positions (learned null tokens replace them later)."""
    remainder = max_len - tokens.shape[1]
    if remainder <= 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, remainder), value=0.0), F.pad(mask, (0, remainder), value=False)


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, cosine_sim: bool, bias: Optional[Tensor] = None,
           key_mask: Optional[Tensor] = None, causal: bool = False, dropout: Optional[nn.Module] = None) -> Tensor:
    """Softmax attention as theirs computes it: q [B, H, N, D]; k, v [B, H, M, D] or one shared head [B, M, D].

    Kept explicit (not SDPA): their masks fill with the dtype's lowest value and the softmax runs in float32, and the
    parity with their checkpoints is to round-off."""
    if cosine_sim:
        q, k = l2norm(q), l2norm(k)
    q, k = q * math.sqrt(scale), k * math.sqrt(scale)
    sim = torch.einsum("bhid,bjd->bhij" if k.ndim == 3 else "bhid,bhjd->bhij", q, k)
    if bias is not None:
        sim = sim + bias
    lowest = -torch.finfo(sim.dtype).max
    if key_mask is not None:
        sim = sim.masked_fill(~rearrange(key_mask, "b j -> b 1 1 j"), lowest)
    if causal:
        i, j = sim.shape[-2:]
        sim = sim.masked_fill(torch.ones(i, j, dtype=torch.bool, device=sim.device).triu(j - i + 1), lowest)
    weights = sim.softmax(dim=-1, dtype=torch.float32).type(sim.dtype)
    if dropout is not None:
        weights = dropout(weights)
    out = torch.einsum("bhij,bjd->bhid" if v.ndim == 3 else "bhij,bhjd->bhid", weights, v)
    return rearrange(out, "b h n d -> b n (h d)")


class NullKeyAttention(nn.Module):
    """Self-attention of the prior (causal, with rotary positions and a relative position bias) and of the unet:
    pre-norm, many query heads and one shared key/value head, a learned null key/value, cosine similarity at a fixed
    scale unless `cosine_sim` is off."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0,
                 rotary: Optional[RotaryEmbedding] = None, causal: bool = False, cosine_sim: bool = True,
                 cosine_sim_scale: float = 16):
        super().__init__()
        self.heads, self.cosine_sim, self.causal = heads, cosine_sim, causal
        self.scale = cosine_sim_scale if cosine_sim else dim_head**-0.5
        self.norm = GainLayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.rotary_emb = rotary  # one module shared by every layer, as theirs: each layer's state dict lists it
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), GainLayerNorm(dim))

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        x = self.norm(x)
        q, (k, v) = self.to_q(x), self.to_kv(x).chunk(2, dim=-1)
        q = rearrange(q, "b n (h d) -> b h n d", h=self.heads) * self.scale
        if self.rotary_emb is not None:
            q, k = self.rotary_emb.rotate(q), self.rotary_emb.rotate(k)
        null_k, null_v = (repeat(z, "d -> b 1 d", b=x.shape[0]) for z in self.null_kv.unbind(dim=-2))
        k, v = torch.cat((null_k, k), dim=-2), torch.cat((null_v, v), dim=-2)
        return self.to_out(attend(q, k, v, self.scale, self.cosine_sim, bias=bias, causal=self.causal, dropout=self.dropout))


def feed_forward(dim: int, mult: int, dropout: float, post_activation_norm: bool) -> nn.Sequential:
    """Pre-norm SwiGLU feed-forward; `post_activation_norm` is NormFormer's extra norm after the gate."""
    inner = int(mult * dim)
    return nn.Sequential(
        GainLayerNorm(dim),
        nn.Linear(dim, inner * 2, bias=False),
        SwiGLU(),
        GainLayerNorm(inner) if post_activation_norm else nn.Identity(),
        nn.Dropout(dropout),
        nn.Linear(inner, dim, bias=False),
    )


class SwiGLU(nn.Module):
    """x * silu(gate) over the two halves of the last dim."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


class TimeMLP(nn.Module):
    """Their prior's continuous time embedding MLP: two hidden layers of width 2 * dim_out, SiLU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        hidden = 2 * dim_out
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim_in, hidden), nn.SiLU(), nn.Identity()),
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Identity()),
            nn.Linear(hidden, dim_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())


# ---- the unet's layers ---------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Pre-norm cross-attention from feature tokens to the conditioning tokens, with a learned null key/value per head
    (8 heads of 64, as their resnet blocks build it)."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8, dim_head: int = 64, cosine_sim: bool = False,
                 cosine_sim_scale: float = 16):
        super().__init__()
        self.heads, self.cosine_sim = heads, cosine_sim
        self.scale = cosine_sim_scale if cosine_sim else dim_head**-0.5
        inner = heads * dim_head
        self.norm = GainLayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), GainLayerNorm(dim))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.norm(x)
        q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))
        null_k, null_v = (repeat(z, "d -> b h 1 d", b=x.shape[0], h=self.heads) for z in self.null_kv.unbind(dim=-2))
        k, v = torch.cat((null_k, k), dim=-2), torch.cat((null_v, v), dim=-2)
        return self.to_out(attend(q, k, v, self.scale, self.cosine_sim))


class LinearAttention(nn.Module):
    """Linear attention over the pixels of a feature map (their `sparse_attn`): softmax over features for queries and
    over positions for keys, so the cost grows with pixels, not their square."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        inner = heads * dim_head
        self.norm = GainLayerNorm(dim, channel_dim=1)
        self.to_qkv = nn.Conv2d(dim, inner * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, dim, 1, bias=False), GainLayerNorm(dim, channel_dim=1))

    def forward(self, fmap: Tensor) -> Tensor:
        height, width = fmap.shape[-2:]
        q, k, v = self.to_qkv(self.norm(fmap)).chunk(3, dim=1)
        q, k, v = (rearrange(z, "b (h c) x y -> (b h) (x y) c", h=self.heads) for z in (q, k, v))
        q, k = q.softmax(dim=-1) * self.scale, k.softmax(dim=-2)
        v = l2norm(v)
        k, v = k / math.sqrt(height * width), v / math.sqrt(height * width)
        context = torch.einsum("bnd,bne->bde", k, v)
        out = torch.einsum("bnd,bde->bne", q, context)
        out = rearrange(out, "(b h) (x y) d -> b (h d) x y", h=self.heads, x=height, y=width)
        return self.to_out(F.gelu(out))


class Residual(nn.Module):
    """fn(x) + x."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class OnPixels(nn.Module):
    """Run a token module over the pixels of a feature map [B, C, H, W]."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        return rearrange(self.fn(rearrange(x, "b c h w -> b (h w) c")), "b (h w) c -> b c h w", h=height)


class StandardizedConv2d(nn.Conv2d):
    """A convolution whose kernels are standardised (zero mean, unit variance) at every call (weight standardization)."""

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        flat = rearrange(self.weight, "o ... -> o (...)")
        mean = flat.mean(dim=-1).view(-1, 1, 1, 1)
        var = torch.var(flat, dim=-1, unbiased=False).view(-1, 1, 1, 1)
        return F.conv2d(x, (self.weight - mean) * (var + eps).rsqrt(), self.bias, self.stride, self.padding)


class ConvBlock(nn.Module):
    """3x3 conv, group norm, optional scale/shift from the time embedding, SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int, weight_standardization: bool):
        super().__init__()
        self.project = (StandardizedConv2d if weight_standardization else nn.Conv2d)(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: Tensor, scale_shift: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        x = self.norm(self.project(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two conv blocks, the first modulated by the time embedding, with cross-attention to the conditioning tokens
    between them when the block has a `cond_dim`."""

    def __init__(self, dim: int, dim_out: int, *, time_cond_dim: int, groups: int, cond_dim: Optional[int] = None,
                 weight_standardization: bool = False, cosine_sim_cross_attn: bool = False):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_cond_dim, dim_out * 2))
        self.cross_attn = CrossAttention(dim_out, context_dim=cond_dim, cosine_sim=cosine_sim_cross_attn) \
            if cond_dim is not None else None
        self.block1 = ConvBlock(dim, dim_out, groups, weight_standardization)
        self.block2 = ConvBlock(dim_out, dim_out, groups, weight_standardization)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        scale_shift = rearrange(self.time_mlp(time_emb), "b c -> b c 1 1").chunk(2, dim=1)
        h = self.block1(x, scale_shift=scale_shift)
        if self.cross_attn is not None:
            height = h.shape[-2]
            tokens = rearrange(h, "b c h w -> b (h w) c")
            tokens = self.cross_attn(tokens, context=cond) + tokens
            h = rearrange(tokens, "b (h w) c -> b c h w", h=height)
        return self.block2(h) + self.res_conv(x)


class CrossEmbedLayer(nn.Module):
    """Convolutions of several kernel sizes side by side, their channels concatenated (half to the smallest kernel)."""

    def __init__(self, dim_in: int, kernel_sizes: tuple[int, ...], dim_out: int, stride: int):
        super().__init__()
        kernel_sizes = sorted(kernel_sizes)
        scales = [int(dim_out / (2**i)) for i in range(1, len(kernel_sizes))]
        scales = [*scales, dim_out - sum(scales)]
        self.convs = nn.ModuleList(nn.Conv2d(dim_in, width, kernel, stride=stride, padding=(kernel - stride) // 2)
                                   for kernel, width in zip(kernel_sizes, scales))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


def downsample(dim: int, dim_out: int) -> nn.Sequential:
    """Pixel-unshuffle, then a 1x1 conv."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, dim_out, 1))


class PixelShuffleUpsample(nn.Module):
    """A 1x1 conv to 4x channels, SiLU, pixel shuffle; the four sub-pixels start equal (ICNR)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        conv = nn.Conv2d(dim, dim_out * 4, 1)
        weight = torch.empty(dim_out, dim, 1, 1)
        nn.init.kaiming_uniform_(weight)
        with torch.no_grad():
            conv.weight.copy_(repeat(weight, "o ... -> (o four) ...", four=4))
            conv.bias.zero_()
        self.net = nn.Sequential(conv, nn.SiLU(), nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def nearest_upsample(dim: int, dim_out: int) -> nn.Sequential:
    """Nearest-neighbour 2x upsampling and a 3x3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))
