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


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[N, M] cosine similarities of two sets of embeddings."""
    return l2norm(a.float()) @ l2norm(b.float()).T


def r_precision(image_embed: Tensor, prompt_embed: Tensor, prompt_index: Optional[Tensor] = None) -> float:
    """How often an image's own prompt ranks first among all `prompt_embed` (CLIP-R-precision, top 1).
    `prompt_index[i]` is image i's prompt (default: image i goes with prompt i)."""
    own = torch.arange(len(image_embed)) if prompt_index is None else prompt_index
    best = cosine_matrix(image_embed, prompt_embed).argmax(dim=1).cpu()
    return (best == own.cpu()).float().mean().item()


def clip_score(image_embed: Tensor, text_embed: Tensor) -> float:
    """CLIPScore (Hessel et al. 2021, w = 100): 100 x max(cos(image, its text), 0), averaged."""
    return (100 * (l2norm(image_embed.float()) * l2norm(text_embed.float())).sum(-1).clamp(min=0)).mean().item()


def cmmd(x: Tensor, y: Tensor, sigma: float = 10.0, scale: float = 1000.0, unbiased: bool = False) -> float:
    """CMMD (Jayasumana et al. 2024): the squared maximum mean discrepancy between two sets of CLIP image
    embeddings with a Gaussian kernel (sigma 10, reported x1000). By default as the paper's code computes it (means
    over whole kernel matrices: never negative, 0 for identical sets, but above 0 for two small samples of one
    distribution); `unbiased` leaves each set's pairs with themselves out (Gretton et al.'s U-statistic: 0 in
    expectation for one distribution, so it can go below 0), which small evaluation sets need to be compared."""
    x, y = l2norm(x.float()), l2norm(y.float())

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma**2))

    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("CMMD needs at least two embeddings on each side")

    def within(k: Tensor) -> Tensor:  # the mean over a set's pairs; unbiased: without each point with itself
        size = len(k)
        return (k.sum() - k.diagonal().sum()) / (size * (size - 1)) if unbiased else k.mean()

    return (scale * (within(kernel(x, x)) + within(kernel(y, y)) - 2 * kernel(x, y).mean())).item()


@torch.no_grad()
def text_image_agreement(clip, images: Tensor, prompts: list[str], prompt_index: Tensor,
                         real_images: Optional[Tensor] = None) -> dict[str, float]:
    """R-precision and CLIP score of generated `images` ([B, 3, H, W] in [0, 1]) against their prompts (image i
    was drawn for prompts[prompt_index[i]]), scored by `clip`; with `real_images` of the same prompts, the same
    figures on them and the CMMD between generated and real."""
    prompt_embed = clip.embed_text(prompts).text_embed
    own = prompt_embed[prompt_index]
    generated = clip.embed_image(images)
    out = {"r_precision": r_precision(generated, prompt_embed, prompt_index), "clip_score": clip_score(generated, own)}
    if real_images is not None:
        real = clip.embed_image(real_images)
        out.update(real_r_precision=r_precision(real, prompt_embed, prompt_index), real_clip_score=clip_score(real, own))
        pairs = len(generated) > 1 and len(real) > 1  # CMMD compares pairs within each set
        out.update(cmmd=cmmd(generated, real) if pairs else float("nan"),
                   cmmd_unbiased=cmmd(generated, real, unbiased=True) if pairs else float("nan"))
    return out
