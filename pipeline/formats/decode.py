"""Encoded image bytes -> CLIP's input pixels as uint8, on CPU, without torch.

The resize is open_clip's own preprocessing (PIL bicubic on the shortest side, then a centre crop), so the
embed stage sees what a CLIP was trained on. JPEGs are decoded at a reduced scale (PIL's draft mode: the
decoder skips DCT detail) when they are at least twice the model's size, which is most of the decode time
saved on web images; the result is still resized by PIL to exactly the model's size. Decode tasks move
uint8 arrays (a quarter of float32) and the CLIP actor normalises on its device.
"""

from __future__ import annotations

import io

import numpy as np


def decode_resized(data: bytes, size: int) -> np.ndarray:
    """[size, size, 3] uint8 RGB: shortest side resized to `size` (bicubic), centre-cropped."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # only ever scales by 1/2, 1/4, 1/8 and never below (size, size)
        image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    if resized == (width, height):
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    # the centre square of the resized image, resampled straight from its box in the source: the same pixels as
    # resizing all then cropping, without an intermediate as long as the image (a 1 x 20000 banner: gigabytes)
    x_scale, y_scale = resized[0] / width, resized[1] / height
    box = (left / x_scale, top / y_scale, (left + size) / x_scale, (top + size) / y_scale)
    return np.asarray(image.resize((size, size), Image.BICUBIC, box=box), dtype=np.uint8)
