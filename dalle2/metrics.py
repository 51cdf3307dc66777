"""Evaluation metrics of the diffusion prior, as LAION reports them."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .layers import l2norm


@torch.no_grad()
def prior_metrics(
    sample_fn: Callable[..., Tensor],
    text_embed: Tensor,
    image_embed: Tensor,
    text_encodings: Optional[Tensor] = None,
    text_mask: Optional[Tensor] = None,
    **sample_kwargs,
) -> dict[str, float]:
    """Cosine similarities on a held-out batch.

    baseline_similarity: text embed vs. true image embed (what CLIP itself gives)
    text_similarity: predicted image embed vs. text embed
    image_similarity: predicted vs. true image embed (the number that should rise)
    unrelated_similarity: predicted vs. another caption's text embed (captions rolled by one)
    """
    if text_embed.shape[0] < 2:
        raise ValueError("prior metrics need a batch of at least 2 to form unrelated pairs")
    predicted = l2norm(
        sample_fn(text_embed=text_embed, text_encodings=text_encodings, text_mask=text_mask, **sample_kwargs).float()
    )
    text_embed, image_embed = l2norm(text_embed.float()), l2norm(image_embed.float())
    unrelated = text_embed.roll(1, dims=0)

    def cosine(a: Tensor, b: Tensor) -> float:
        return (a * b).sum(-1).mean().item()

    return {
        "baseline_similarity": cosine(text_embed, image_embed),
        "text_similarity": cosine(predicted, text_embed),
        "image_similarity": cosine(predicted, image_embed),
        "unrelated_similarity": cosine(predicted, unrelated),
    }
