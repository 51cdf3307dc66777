"""The embed stage's decode: encoded bytes -> CLIP's input size, as the model's own preprocessing does it."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2.clip import clip_preprocess
from jobs import shapes
from pipeline.formats.decode import decode_resized

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90)
    return buffer.getvalue()


def thirds(width: int, height: int, horizontal: bool) -> Image.Image:
    """Red, green, blue thirds side by side (or stacked): a centre crop keeps only green."""
    array = np.zeros((height, width, 3), np.uint8)
    for i, colour in enumerate((RED, GREEN, BLUE)):
        if horizontal:
            array[:, i * width // 3:(i + 1) * width // 3] = colour
        else:
            array[i * height // 3:(i + 1) * height // 3] = colour
    return Image.fromarray(array)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("width,height", [(300, 100), (100, 300), (640, 211)])
def test_the_shortest_side_is_resized_and_the_centre_kept(fmt, width, height):
    pixels = decode_resized(encoded(thirds(width, height, horizontal=width > height), fmt), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    # the long side is 3x the short one: the kept square is the green third, edges included
    assert (np.abs(pixels.astype(int) - GREEN).max(axis=-1) < 60).mean() > 0.9


@pytest.mark.parametrize("fmt,tolerance", [("PNG", 0.004), ("JPEG", 0.015)])
@pytest.mark.parametrize("size", [64, 97, 520])
def test_pixels_match_the_full_decode_resized_by_the_model_preprocessing(fmt, tolerance, size):
    """JPEGs decode at a reduced scale (draft mode); the pixels stay within a couple of levels of a full decode
    resized by clip_preprocess (what ClipAdapter.embed_image does), PNGs within rounding."""
    for spec in shapes.all_specs()[::9]:
        image = shapes.draw(spec, size=size).resize((size * 4 // 3, size))
        data = encoded(image, fmt)
        full = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)[None] / 255
        reference = clip_preprocess(full, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0].permute(1, 2, 0).numpy()
        ours = decode_resized(data, 32) / 255
        assert np.abs(ours - reference).mean() < tolerance, spec.caption


def test_undecodable_bytes_raise():
    with pytest.raises(Exception):
        decode_resized(b"not an image", 32)


def test_a_banner_is_cropped_before_it_is_resized():
    """A 20000 x 2 banner resized whole to a 224 px short side would be 2.2M x 224 pixels (1.5 GB): the centre
    square is resampled straight from the source instead."""
    pixels = decode_resized(encoded(Image.new("RGB", (20000, 2), GREEN), "PNG"), 224)
    assert pixels.shape == (224, 224, 3) and (pixels == GREEN).all()
