"""The built-in data set: generated images of coloured shapes with compositional captions.

Every image shows one shape of one colour at one position on a light background, so a caption like
"a red circle on the left" says everything in the picture, and whether a generated image matches
its prompt can be measured (dominant colour, outline, position of the colour mass).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("left", "center", "right")
BACKGROUND = (245, 245, 240)


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; `caption` is its text."""

    shape: str
    color: str
    position: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} {where}"


def all_specs(colors: Iterable[str] | None = None) -> list[ShapeSpec]:
    """Every combination of shape, colour (the whole palette, or these `colors` of it) and position."""
    palette = [c for c in COLORS if colors is None or c in set(colors)]
    return [ShapeSpec(s, c, p) for s in SHAPES for c in palette for p in POSITIONS]


def spec_of(caption: str) -> ShapeSpec:
    """The combination a built-in caption names; ValueError naming the caption otherwise."""
    for spec in all_specs():
        if spec.caption == caption:
            return spec
    raise ValueError(f"{caption!r} is not a built-in caption: they read like {all_specs()[0].caption!r} "
                     f"({', '.join(COLORS)}; {', '.join(SHAPES)}; on the left / in the center / on the right)")


def draw(spec: ShapeSpec, size: int = 64, jitter: float = 0.0, rng: random.Random | None = None) -> Image.Image:
    """Render `spec` as an RGB image; `jitter` (fraction of the size) moves and scales it a little."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    centre_x = {"left": 0.25, "center": 0.5, "right": 0.75}[spec.position] * size
    centre_y = 0.5 * size
    radius = size * 0.18 * (1 + rng.uniform(-jitter, jitter))
    centre_x += rng.uniform(-jitter, jitter) * size
    centre_y += rng.uniform(-jitter, jitter) * size
    box = [centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius]
    fill = COLORS[spec.color]
    if spec.shape == "square":
        pen.rectangle(box, fill=fill)
    elif spec.shape == "circle":
        pen.ellipse(box, fill=fill)
    else:
        pen.polygon([(centre_x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def generate(count: int, size: int = 64, seed: int = 0, jitter: float = 0.05, withhold: Iterable[str] = (),
             colors: Iterable[str] | None = None) -> Iterator[tuple[ShapeSpec, Image.Image]]:
    """`count` (spec, image) pairs cycling through every combination (of `colors`, default the whole palette) but
    the `withhold` captions, each drawn with its own jitter."""
    rng = random.Random(seed)
    withheld = set(withhold)
    specs = [spec for spec in all_specs(colors) if spec.caption not in withheld]
    for i in range(count):
        if i % len(specs) == 0:
            rng.shuffle(specs)
        spec = specs[i % len(specs)]
        yield spec, draw(spec, size=size, jitter=jitter, rng=rng)


def write_shards(root: str, count: int, per_shard: int = 250, size: int = 64, seed: int = 0) -> list[tuple[ShapeSpec, "Image.Image"]]:
    """Write `count` generated samples as img2dataset-style shards under <root>/shards (tar, parquet with
    statuses, stats file), without a download; returns the samples in key order."""
    import io
    import tarfile

    import pyarrow as pa

    from pipeline.run.layout import RunLayout, index_width, make_key, shard_name
    from pipeline.run.storage import write_atomic, write_json, write_parquet

    layout = RunLayout(root)
    samples = list(generate(count, size=size, seed=seed))
    digits = index_width(per_shard)
    for shard_id, start in enumerate(range(0, count, per_shard)):
        name, chunk = shard_name(shard_id), samples[start : start + per_shard]
        keys = [make_key(shard_id, i, len(name), digits) for i in range(len(chunk))]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for key, (spec, image) in zip(keys, chunk):
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG", quality=95)
                for ext, data in (("jpg", jpg.getvalue()), ("txt", spec.caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        write_atomic(layout.shard_tar(name), buffer.getvalue())
        write_parquet(layout.shard_parquet(name), pa.table({
            "key": keys, "caption": [s.caption for s, _ in chunk], "status": ["success"] * len(keys),
            "original_width": [size] * len(keys), "original_height": [size] * len(keys)}))
        write_json(layout.shard_stats(name), {"count": len(keys), "successes": len(keys)})
    return samples


def describe(array) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, position) of the shape in an RGB uint8 array [H, W, 3], or Nones when nothing is drawn.

    Colour: the palette colour nearest the mean of the non-background pixels. Position: left/center/right
    from their horizontal centre of mass. Shape, inside the bounding box of those pixels: a triangle narrows
    towards the top (its top third is far narrower than its bottom third); a square fills the box's corners,
    a circle leaves them mostly empty. Both cues survive JPEG and the blur of a small generated image.
    """
    import numpy as np

    pixels = np.asarray(array, dtype=np.float32)
    mask = np.linalg.norm(pixels - np.asarray(BACKGROUND, np.float32), axis=-1) > 60
    if mask.sum() < max(4, 0.01 * mask.size):
        return None, None, None
    mean = pixels[mask].mean(axis=0)
    color = min(COLORS, key=lambda name: np.linalg.norm(mean - np.asarray(COLORS[name], np.float32)))
    x = np.nonzero(mask)[1].mean() / mask.shape[1]
    position = "left" if x < 0.4 else "right" if x > 0.6 else "center"
    return color, shape_of(mask), position


def shape_of(mask) -> str:
    """square, circle or triangle for a boolean mask [H, W] of one filled shape."""
    import numpy as np

    # the box spans rows and columns with at least two pixels, so a stray JPEG speck does not stretch it
    rows, cols = np.nonzero(mask.sum(axis=1) >= 2)[0], np.nonzero(mask.sum(axis=0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return "circle"
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float32)
    height, width = box.shape
    widths, third = box.sum(axis=1), max(1, height // 3)
    if widths[:third].mean() < 0.6 * max(widths[-third:].mean(), 1.0):
        return "triangle"
    qh, qw = max(1, round(height / 4)), max(1, round(width / 4))
    corners = np.mean([box[:qh, :qw].mean(), box[:qh, -qw:].mean(), box[-qh:, :qw].mean(), box[-qh:, -qw:].mean()])
    return "square" if corners > 0.7 else "circle"


# the built-in demo's prompts, sampled and scored at the end of its run
PROMPTS = [
    "a red circle on the left", "a blue square on the right", "a green triangle in the center",
    "a yellow square on the left", "a purple circle on the right", "an orange triangle on the left",
]


def seen_prompts(withhold: Iterable[str], colors: Iterable[str] | None = None) -> list[str]:
    """The demo's prompts of combinations its data set has: in its colours (None: all), not withheld."""
    withheld, drawn = set(withhold), None if colors is None else set(colors)
    return [p for p in PROMPTS if p not in withheld and (drawn is None or spec_of(p).color in drawn)]
