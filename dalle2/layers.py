"""Small building blocks shared by the prior transformer and the decoder U-Net."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """Unit-normalise along `dim`."""
    return F.normalize(x, dim=dim)


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of a (possibly fractional) timestep, as in the Transformer paper."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


def time_mlp(dim: int, out_dim: int) -> nn.Sequential:
    """Sinusoidal features of t followed by a two-layer MLP."""
    return nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class Attention(nn.Module):
    """Multi-head attention through SDPA; self-attention, or cross-attention when `context` is given."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, context_dim: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None, causal: bool = False
    ) -> Tensor:
        """x: [B, N, dim]; context: [B, M, context_dim]; mask: [B, M] True where a key may be attended."""
        q = self.to_q(x)
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))
        attn_mask = None if mask is None else rearrange(mask, "b m -> b 1 1 m")
        if causal and attn_mask is not None:  # SDPA takes one or the other: combine them, never drop causality
            n, m = q.shape[-2], k.shape[-2]
            attn_mask = attn_mask & torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, inner * 2, bias=False)
        self.proj_out = nn.Sequential(nn.Dropout(dropout), nn.Linear(inner, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(x * F.silu(gate))


class Checkpointable:
    """A network whose blocks recompute their activations in the backward pass when `gradient_checkpointing` is on
    (training only): it calls its blocks through `self.checkpointed`."""

    gradient_checkpointing = False

    def checkpointed(self, block, *args, **kwargs):
        """`block(*args, **kwargs)`, its activations dropped after the forward pass and recomputed in the backward
        (dropout replays the same random draws) when checkpointing is on and gradients are wanted."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)


def set_gradient_checkpointing(module: nn.Module, on: bool) -> None:
    """Switch gradient checkpointing on or off in every checkpointable network inside `module` (an open_clip model:
    through its own switch)."""
    if hasattr(module, "set_grad_checkpointing"):
        module.set_grad_checkpointing(on)
        return
    found = [m for m in module.modules() if isinstance(m, Checkpointable)]
    if not found:
        raise ValueError(f"trainer.gradient_checkpointing: {type(module).__name__} has no checkpointable blocks")
    for network in found:
        network.gradient_checkpointing = on
