"""A run's trained DALLE2 with the run's sampling settings: every way to sample it, for `dalle2 sample` and the
service alike (text to image, variations, interpolation, inpainting, upscaling), and the checks on given images."""

from __future__ import annotations

import io
import logging
from typing import Optional, Union

log = logging.getLogger(__name__)

# Images given to sample from (files, uploads) are hostile bytes: both limits are checked before any pixel is decoded.
MAX_IMAGE_BYTES = 16 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """A given image (or mask) that cannot be used; the message names it and why."""


# what given images may be: the web's formats (a decoder for each of Pillow's forty formats is attack surface)
FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, name: str, mode: str = "RGB", formats: tuple[str, ...] = FORMATS):
    """An image's bytes (one of `formats`) as a float tensor [C, H, W] in [0, 1] (C: 3 for RGB, 1 for a mask's L),
    within the size limits; ImageError naming `name` otherwise."""
    import numpy as np
    import torch
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: {len(data)} bytes, more than the {MAX_IMAGE_BYTES} allowed")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            width, height = image.size  # from the header: checked before a pixel is decoded
            if width * height > MAX_IMAGE_PIXELS or min(width, height) < 1:
                raise ImageError(f"{name}: {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} allowed")
            array = np.asarray(image.convert(mode), dtype=np.float32) / 255
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a hostile file makes Pillow raise (bombs included)
        raise ImageError(f"{name}: not a {'/'.join(formats)} image this can read ({type(error).__name__}: "
                         f"{str(error)[:200]})") from None
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def read_image(path: str, mode: str = "RGB"):
    """An image file (local or any fsspec URL) as decode_image gives it; ImageError naming the file."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except (OSError, ValueError) as error:
        raise ImageError(f"{path}: cannot be read ({error})") from None
    return decode_image(data, path, mode)


def keep_mask_of(mask, size: tuple[int, int]):
    """A mask image [1, H, W] in [0, 1] as the pixels to keep [H, W] (bool) at `size`: white is repainted, black
    kept, as in diffusers' inpainting."""
    import torch.nn.functional as F

    return F.interpolate(mask[None], size=size, mode="nearest")[0, 0] < 0.5


class RunModel:
    """A run's DALLE2 (its latest prior and decoder) and its `sampling` settings, loaded once."""

    def __init__(self, root: str, device: str = "cpu", seed: int = 0):
        import torch

        from .checkpoints import load_dalle2
        from .run_config import load_run_config

        self.run = load_run_config(root)
        self.device = device
        torch.manual_seed(seed)  # a run without CLIP weights of its own builds one (its imported models): the same one
        self.model = load_dalle2(self.run).to(device).eval()

    @property
    def image_size(self) -> int:
        return self.model.decoder.image_sizes[-1]

    def settings(self, overrides: Optional[dict] = None):
        """The run's sampling settings with `overrides` (SamplingConfig's fields) applied and validated."""
        defaults = self.run.sampling
        return defaults.model_validate({**defaults.model_dump(), **(overrides or {})})

    def _generators(self, seed: int):
        """The prior's and the decoder's generators: apart, so that an image depends only on its embedding and the
        seed (an interpolation's endpoints are the plain samples)."""
        import torch

        return torch.Generator(self.device).manual_seed(seed), torch.Generator(self.device).manual_seed(seed + 1)

    def _decode_kwargs(self, used) -> dict:
        return dict(cond_scale=used.decoder_cond_scale, sample_timesteps=used.steps, sampler=used.sampler)

    def embed_prompts(self, prompts: list[str], used, seed: int, negative_prompt: Optional[str] = None):
        """The prior's image embeds [len(prompts), D] for the prompts (drawn from the seed's prior generator)."""
        if negative_prompt is not None and used.prior_cond_scale == 1:
            raise ValueError("a negative prompt acts through the prior's guidance: set prior_cond_scale above 1 "
                             "(--prior-cond-scale)")
        return self.model.image_embed(
            prompts, cond_scale=used.prior_cond_scale, generator=self._generators(seed)[0], num_samples=used.candidates,
            sample_timesteps=used.steps, sampler=used.sampler,
            negative_text=None if negative_prompt is None else [negative_prompt] * len(prompts))

    def text_to_image(self, prompts: list[str], n: int = 1, used=None, seed: int = 0,
                      negative_prompt: Optional[str] = None):
        """Images [len(prompts) * n, 3, H, W] in [0, 1], prompt-major, on the CPU."""
        used = used or self.settings()
        texts = [p for p in prompts for _ in range(n)]
        embeds = self.embed_prompts(texts, used, seed, negative_prompt)
        return self.model.decode(embeds, text=texts, generator=self._generators(seed)[1],
                                 **self._decode_kwargs(used)).cpu()

    def image_embeds(self, images: list):
        """CLIP image embeds [B, D] of images [3, H, W] of any sizes, each preprocessed as the rows were (shortest
        side resized, centre crop)."""
        import torch

        return torch.cat([self.model.clip.embed_image(image[None].to(self.device)) for image in images])

    def variations(self, images: list, n: int = 1, used=None, seed: int = 0):
        """`n` variations of each image [3, H, W] in [0, 1] (any sizes), image-major, on the CPU: its CLIP embed
        decoded again."""
        used = used or self.settings()
        embeds = self.image_embeds(images).repeat_interleave(n, dim=0)
        return self.model.decode(embeds, generator=self._generators(seed)[1], **self._decode_kwargs(used)).cpu()

    def endpoint(self, source: Union[str, "object"], used, seed: int):
        """An interpolation endpoint's image embed [D] and text: a prompt's prior embed, or an image's CLIP embed."""
        if isinstance(source, str):
            return self.embed_prompts([source], used, seed)[0], source
        return self.image_embeds([source])[0], ""

    def interpolate(self, start, end, frames: int = 8, used=None, seed: int = 0):
        """Images [frames, 3, H, W] from `start` to `end` (each a prompt or an image [3, H, W] in [0, 1]), on the
        CPU: the first and last are the plain samples of the endpoints with this seed."""
        used = used or self.settings()
        (start_embed, start_text), (end_embed, end_text) = (self.endpoint(s, used, seed) for s in (start, end))
        return self.model.interpolate(start_embed, end_embed, frames, seed=seed + 1, texts=(start_text, end_text),
                                      **self._decode_kwargs(used)).cpu()

    def inpaint(self, image, keep, prompt: str, n: int = 1, used=None, seed: int = 0):
        """`n` images [n, 3, H, W] that keep `image`'s pixels where `keep` [H, W] is True and draw the rest for
        `prompt` (RePaint), on the CPU."""
        used = used or self.settings()
        if used.sampler == "dpmpp":
            raise ValueError("inpainting resamples with DDIM or DDPM steps: choose --sampler ddim or ddpm")
        embeds = self.embed_prompts([prompt] * n, used, seed)
        images, masks = image[None].expand(n, -1, -1, -1), keep[None].expand(n, -1, -1)
        return self.model.decode(embeds, text=[prompt] * n, generator=self._generators(seed)[1],
                                 inpaint_image=images.to(self.device), inpaint_mask=masks.to(self.device),
                                 **self._decode_kwargs(used)).cpu()

    def upscale(self, images: list, used=None, seed: int = 0):
        """Images [3, H, W] in [0, 1] (any sizes) through the decoder's upsamplers to its last size, each conditioned
        on its own CLIP embed, on the CPU."""
        from dalle2.decoder import resize_image

        used = used or self.settings()
        low = self.model.decoder.image_sizes[0]
        import torch

        start = torch.cat([resize_image(image[None], low) for image in images]).to(self.device)
        return self.model.upscale(start, image_embed=self.image_embeds(images), generator=self._generators(seed)[1],
                                  **self._decode_kwargs(used)).cpu()
