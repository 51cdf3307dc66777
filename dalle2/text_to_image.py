"""DALLE2: text -> prior -> image embedding -> decoder cascade -> pixels."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .decoder import Decoder
from .prior import DiffusionPrior


class DALLE2(nn.Module):
    """The end-to-end model: strings or token ids in, images in [0, 1] out; and the other ways to sample it
    (variations of images, interpolation, inpainting, upscaling), all from the same two parts."""

    def __init__(self, prior: DiffusionPrior, decoder: Decoder, prior_num_samples: Optional[int] = None):
        """`prior_num_samples`: the prior's candidates per text (None: its config's num_samples_per_batch)."""
        super().__init__()
        if prior.clip is None:
            raise ValueError("DALLE2 needs a prior with CLIP to turn text into embeddings")
        self.prior, self.decoder, self.prior_num_samples = prior, decoder, prior_num_samples

    @property
    def clip(self) -> nn.Module:
        return self.prior.clip

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
        negative_text: Optional[Sequence[str]] = None,
        decoder_generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Images [B, 3, H, W] in [0, 1]; `cond_scale` guides both parts unless one is given its own. Candidates,
        steps and sampler default to the models' configs. The decoder draws from `decoder_generator` when given
        (then an image depends on its prior embedding and that seed alone), else from `generator` after the prior."""
        if isinstance(text, str):
            text = [text]
        image_embed = self.image_embed(
            text, cond_scale=prior_cond_scale if prior_cond_scale is not None else cond_scale, generator=generator,
            num_samples=prior_num_samples, sample_timesteps=sample_timesteps, sampler=sampler,
            negative_text=negative_text,
        )
        return self.decode(
            image_embed, text=text, cond_scale=decoder_cond_scale if decoder_cond_scale is not None else cond_scale,
            generator=decoder_generator or generator, sample_timesteps=sample_timesteps, sampler=sampler,
        )

    @torch.no_grad()
    def image_embed(self, text: Sequence[str], cond_scale: float = 1.0, generator: Optional[torch.Generator] = None,
                    num_samples: Optional[int] = None, sample_timesteps: Optional[int] = None,
                    sampler: Optional[str] = None, negative_text: Optional[Sequence[str]] = None) -> Tensor:
        """The prior's unit-norm image embeds [B, D] for texts (the best of `num_samples` candidates each)."""
        encoded = self.clip.embed_text(text)
        return self.prior.sample(
            text_embed=encoded.text_embed, text_encodings=encoded.text_encodings, text_mask=encoded.mask,
            cond_scale=cond_scale, num_samples_per_batch=num_samples or self.prior_num_samples, generator=generator,
            sample_timesteps=sample_timesteps, sampler=sampler, negative_text=negative_text,
        )

    @torch.no_grad()
    def decode(self, image_embed: Tensor, text: Optional[Sequence[str]] = None, **sample_kwargs) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] from image embeds through the decoder cascade (Decoder.sample's keywords:
        cond_scale, generator, inpainting, start_at_unet_number, ...). A decoder that conditions on text encodings
        gets `text`'s, or the empty caption's when there is none (variations of an image)."""
        if any(u.cond_on_text_encodings for u in self.decoder.config.unets):
            captions = [""] * len(image_embed) if text is None else text if isinstance(text, Tensor) else list(text)
            encoded = self.clip.embed_text(captions)
            sample_kwargs.update(text_encodings=encoded.text_encodings, text_mask=encoded.mask)
        return self.decoder.sample(image_embed=image_embed, **sample_kwargs)

    @torch.no_grad()
    def variations(self, images: Tensor, num_variations: int = 1, **decode_kwargs) -> Tensor:
        """`num_variations` new images of each of `images` [B, 3, H, W] in [0, 1]: their CLIP image embeds decoded
        again (DALL-E 2 section 3.1), image-major [B * num_variations, 3, H', W']."""
        embed = self.clip.embed_image(images).repeat_interleave(num_variations, dim=0)
        return self.decode(embed, **decode_kwargs)

    @torch.no_grad()
    def interpolate(self, start: Tensor, end: Tensor, frames: int, seed: int = 0,
                    texts: Optional[tuple[str, str]] = None, **decode_kwargs) -> Tensor:
        """Images [frames, 3, H, W] along the great circle from image embed `start` [D] to `end` [D] (DALL-E 2
        section 3.2). Every frame is decoded from the same noise (a generator seeded `seed`, one frame at a
        time), so the first and last are the plain decodes of the endpoints; a decoder on text encodings gets
        the nearer endpoint's text of `texts`."""
        if frames < 2:
            raise ValueError(f"frames must be at least 2 (the two endpoints), got {frames}")
        embeds = slerp(start, end, torch.linspace(0, 1, frames))
        out = []
        for i, embed in enumerate(embeds):
            text = None if texts is None else [texts[0] if i < frames / 2 else texts[1]]
            generator = torch.Generator(embed.device).manual_seed(seed)
            out.append(self.decode(embed[None], text=text, generator=generator, **decode_kwargs))
        return torch.cat(out)

    @torch.no_grad()
    def upscale(self, images: Tensor, image_embed: Optional[Tensor] = None, **decode_kwargs) -> Tensor:
        """`images` [B, 3, H, W] in [0, 1] through the cascade's upsamplers (unet 2 on) to its last size,
        conditioned on their own CLIP image embeds unless `image_embed` is given."""
        if len(self.decoder.unets) < 2:
            raise ValueError("this decoder has one unet: it has no upsampler to upscale with")
        embed = image_embed if image_embed is not None else self.clip.embed_image(images)
        return self.decode(embed, start_at_unet_number=2, start_image=images, **decode_kwargs)


def slerp(start: Tensor, end: Tensor, weights: Tensor) -> Tensor:
    """Spherical interpolation of two unit vectors [D] at `weights` [N] in [0, 1]: [N, D] unit vectors, the
    endpoints exactly at weights 0 and 1."""
    start, end = start.float(), end.float()
    weights = weights.to(start)[:, None]
    angle = torch.arccos((start @ end).clamp(-1, 1))
    if angle > math.pi - 1e-4:
        raise ValueError("the two embeddings point in opposite directions: no one great circle joins them")
    if angle < 1e-4:  # (nearly) the same direction: a straight line, normalised
        out = torch.nn.functional.normalize(start * (1 - weights) + end * weights, dim=-1)
    else:
        out = (torch.sin((1 - weights) * angle) * start + torch.sin(weights * angle) * end) / torch.sin(angle)
    out[weights[:, 0] == 0], out[weights[:, 0] == 1] = start, end
    return out


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] images in [0, 1] as PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] images in [0, 1] as a uint8 array [B, H, W, 3]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
