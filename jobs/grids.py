"""Image grids that say what they show: each row carries its prompt or caption as text on its left."""

from __future__ import annotations

import io
import textwrap
from typing import Sequence

import numpy as np

LABEL_WIDTH = 220  # pixels of text beside each row
MIN_CELL = 96  # small images are enlarged (nearest neighbour) to at least this, so they can be seen
PAD = 4


def labelled_grid(images: np.ndarray, labels: Sequence[str], columns: int) -> bytes:
    """PNG bytes: uint8 images [N, H, W, 3] in rows of `columns`, row r labelled `labels[r]` on its left."""
    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images)
    rows = -(-len(images) // columns)
    if len(labels) != rows:
        raise ValueError(f"{rows} rows of {columns} images need {rows} labels, got {len(labels)}")
    height, width = images.shape[1:3]
    scale = max(1, -(-MIN_CELL // max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    font = ImageFont.load_default(size=13)
    canvas = Image.new("RGB", (LABEL_WIDTH + columns * (cell_w + PAD) + PAD, rows * (cell_h + PAD) + PAD), "white")
    pen = ImageDraw.Draw(canvas)
    for row, label in enumerate(labels):
        top = PAD + row * (cell_h + PAD)
        lines = textwrap.wrap(label, width=28)[: max(1, cell_h // 16)]
        pen.multiline_text((PAD, top + 2), "\n".join(lines), fill=(20, 20, 20), font=font, spacing=3)
        for column in range(columns):
            i = row * columns + column
            if i >= len(images):
                break
            tile = Image.fromarray(images[i]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + PAD + column * (cell_w + PAD), top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
