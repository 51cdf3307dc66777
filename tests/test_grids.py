"""Labelled grids: every row carries its text, every image lands in its cell, enlarged so it can be seen."""

import io

import numpy as np
import pytest
from PIL import Image

from jobs.grids import LABEL_WIDTH, PAD, labelled_grid


def test_each_row_has_its_label_and_its_images():
    colours = np.array([[200, 30, 30], [30, 30, 200], [30, 160, 30], [230, 200, 20]], np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (4, 32, 32, 3)).copy()
    grid = np.asarray(Image.open(io.BytesIO(labelled_grid(images, ["first row", "second row"], columns=2))))
    cell = 96  # 32 px enlarged three times
    assert grid.shape == (2 * (cell + PAD) + PAD, LABEL_WIDTH + 2 * (cell + PAD) + PAD, 3)
    for i, colour in enumerate(colours):
        row, column = divmod(i, 2)
        top, left = PAD + row * (cell + PAD), LABEL_WIDTH + PAD + column * (cell + PAD)
        assert (grid[top : top + cell, left : left + cell] == colour).all(), i
    for row in range(2):  # dark text on the white label area of each row
        label = grid[PAD + row * (cell + PAD) : PAD + row * (cell + PAD) + 20, :LABEL_WIDTH]
        assert (label.min(axis=-1) < 100).sum() > 30, row
    blank = np.asarray(Image.open(io.BytesIO(labelled_grid(images, ["", ""], columns=2))))
    assert (blank[:, :LABEL_WIDTH].min(axis=-1) < 100).sum() == 0  # the dark pixels above were the text


def test_a_label_per_row_is_required():
    with pytest.raises(ValueError, match="2 rows of 2 images need 2 labels, got 1"):
        labelled_grid(np.zeros((4, 8, 8, 3), np.uint8), ["only one"], columns=2)
