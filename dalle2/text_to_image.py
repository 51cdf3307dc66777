"""DALLE2: text -> prior -> image embedding -> decoder cascade -> pixels."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .decoder import Decoder
from .prior import DiffusionPrior


class DALLE2(nn.Module):
    """The end-to-end model: strings or token ids in, images in [0, 1] out."""

    def __init__(self, prior: DiffusionPrior, decoder: Decoder, prior_num_samples: Optional[int] = None):
        """`prior_num_samples`: the prior's candidates per text (None: its config's num_samples_per_batch)."""
        super().__init__()
        if prior.clip is None:
            raise ValueError("DALLE2 needs a prior with CLIP to turn text into embeddings")
        self.prior, self.decoder, self.prior_num_samples = prior, decoder, prior_num_samples

    @torch.no_grad()
    def forward(
        self,
        text: Union[Sequence[str], Tensor],
        cond_scale: float = 1.0,
        prior_cond_scale: Optional[float] = None,
        decoder_cond_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        prior_num_samples: Optional[int] = None,
        sample_timesteps: Optional[int] = None,
        sampler: Optional[str] = None,
    ) -> Tensor:
        """Images [B, 3, H, W] in [0, 1]; `cond_scale` guides both parts unless one is given its own. Candidates,
        steps and sampler default to the models' configs."""
        if isinstance(text, str):
            text = [text]
        clip = self.prior.clip
        encoded = clip.embed_text(text)
        image_embed = self.prior.sample(
            text_embed=encoded.text_embed, text_encodings=encoded.text_encodings, text_mask=encoded.mask,
            cond_scale=prior_cond_scale if prior_cond_scale is not None else cond_scale,
            num_samples_per_batch=prior_num_samples or self.prior_num_samples, generator=generator,
            sample_timesteps=sample_timesteps, sampler=sampler,
        )
        return self.decoder.sample(
            image_embed=image_embed, text_encodings=encoded.text_encodings, text_mask=encoded.mask,
            cond_scale=decoder_cond_scale if decoder_cond_scale is not None else cond_scale, generator=generator,
            sample_timesteps=sample_timesteps, sampler=sampler,
        )


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] images in [0, 1] as PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] images in [0, 1] as a uint8 array [B, H, W, 3]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
