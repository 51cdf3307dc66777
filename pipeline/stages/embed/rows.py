"""The embed stage's rows: every column name of its two streams, and how a row of each is built and read.

    the sample stream (read -> decode -> CLIP -> write tasks): a row per sample (kind SAMPLE), then one last row
        per shard: kind END (COUNT: the samples its tar held) or kind FAILED (ERROR: why it could not be read)
    the part stream (write tasks -> driver): a PartRow per scratch part written (kind SAMPLE: PART holds ROWS
        samples), and each END / FAILED row passed on

A row's kind says what it is; ERROR holds only a real error: a sample's (a corrupt image, a non-finite
embedding...) or a failed shard's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np

from pipeline.run.layout import CAPTION, KEY, SHARD  # every module of the stage takes its columns from here

# the kinds of row
SAMPLE, END, FAILED = "sample", "end", "failed"
KINDS = (SAMPLE, END, FAILED)

# the sample stream's columns (with SHARD, KEY, CAPTION)
KIND, COUNT, ERROR = "kind", "count", "error"
TAR = "tar"  # the input: one item (SHARD, TAR) per shard
IMAGE = "image"  # a sample's image bytes (read -> decode, within a decode task)
PIXELS = "pixels"  # uint8 [H, W, 3] at CLIP's input size (decode -> CLIP)
IMG_EMB, TEXT_EMB = "img_emb", "text_emb"  # (CLIP -> write, and the columns of a scratch part)
EMBEDDED_AT, LOADED_AT = "embedded_at", "loaded_at"  # when CLIP embedded the row, when its actor loaded the model

# the part stream's columns (with SHARD, KIND, COUNT, ERROR, LOADED_AT)
PART, ROWS = "part", "rows"  # a scratch part's path and its samples
FIRST_AT, FIRST_ROWS, LAST_AT = "first_at", "first_rows", "last_at"  # a part's first CLIP batch (when, rows), last


def read_row(shard: str, kind: str, key: str = "", image: bytes = b"", caption: str = "", count: int = 0,
             error: str = "") -> dict:
    """A row of the sample stream as a decode task reads it from a tar."""
    return {SHARD: shard, KIND: kind, KEY: key, IMAGE: image, CAPTION: caption, COUNT: count, ERROR: error}


def sample_row(shard: str, key: str, image: bytes, caption: str, error: str = "") -> dict:
    return read_row(shard, SAMPLE, key, image, caption, error=error)


def end_row(shard: str, count: int) -> dict:
    """The row after a shard's last sample: `count` samples were read from its tar."""
    return read_row(shard, END, count=count)


def failed_row(shard: str, error: str) -> dict:
    """The row that ends a shard that could not be read (and decoded) whole, with the reason."""
    return read_row(shard, FAILED, error=error)


def samples(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows of a sample-stream batch are samples (a batch without a kind column is samples only)."""
    if KIND not in batch:
        return np.ones(len(batch[ERROR]), dtype=bool)
    return np.asarray([kind == SAMPLE for kind in batch[KIND]], dtype=bool)


@dataclass(frozen=True)
class PartRow:
    """A row of the part stream: a scratch part of a shard's samples (SAMPLE), its end (END) or failure (FAILED).
    A part's timing fields are its rows' CLIP times; loaded_at is when the first CLIP actor whose rows the write
    task had loaded its model."""

    shard: str
    kind: str
    count: int = 0  # END: the samples the shard's tar held
    part: str = ""  # SAMPLE: the part's path
    rows: int = 0  # SAMPLE: the samples in the part
    error: str = ""  # FAILED: why the shard failed
    first_at: float = 0.0
    first_rows: int = 0
    last_at: float = 0.0
    loaded_at: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"embed: a part-stream row of kind {self.kind!r} (shard {self.shard}); kinds: {KINDS}")


PART_COLUMNS = (SHARD, KIND, COUNT, PART, ROWS, ERROR, FIRST_AT, FIRST_ROWS, LAST_AT, LOADED_AT)
assert PART_COLUMNS == tuple(f.name for f in fields(PartRow))


def part_batch(rows: list[PartRow]) -> dict[str, np.ndarray]:
    """Part rows as the columns a write task returns to Ray Data."""
    return {column: np.asarray([getattr(row, column) for row in rows]) for column in PART_COLUMNS}


def part_rows(batch: dict[str, np.ndarray]) -> Iterator[PartRow]:
    """The rows of a part-stream batch (as the driver receives it)."""
    for values in zip(*(batch[column].tolist() for column in PART_COLUMNS)):
        yield PartRow(*values)
