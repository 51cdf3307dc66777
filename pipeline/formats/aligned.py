"""The shard-aligned embedding layout, written by embed and reorder, read by the training loaders.

For shard S with N sample slots: aligned/img_emb/img_emb_S.npy [N, D], aligned/text_emb/text_emb_S.npy
[N, D] and aligned/S.parquet (index, key, caption, present). Row i is the sample with index i in the
shard; slots with no sample (failed downloads, corrupt images) are zeros with present = False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.run.layout import CAPTION, INDEX, KEY, PRESENT, RunLayout, make_key
from pipeline.run.storage import list_files, read_npy, read_parquet, write_npy, write_parquet


@dataclass
class AlignedShard:
    """One shard's aligned embeddings, in memory."""

    img_emb: np.ndarray  # [N, D]
    text_emb: Optional[np.ndarray]  # [N, D] or None when the source had no text embeddings
    keys: list[str]
    captions: list[str]
    present: np.ndarray  # [N] bool


def align(
    shard_id: int,
    slots: int,
    shard_digits: int,
    index_digits: int,
    indices: np.ndarray,
    img_emb: np.ndarray,
    text_emb: Optional[np.ndarray],
    captions: list[str],
) -> AlignedShard:
    """Place rows (given with their in-shard `indices`, any order) at their slots of an N-slot shard."""
    if len(indices) and (indices.min() < 0 or indices.max() >= slots):
        raise ValueError(f"shard {shard_id}: index {int(indices.max())} outside its {slots} slots")
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"shard {shard_id}: duplicate sample indices")
    dim = img_emb.shape[1]
    out_img = np.zeros((slots, dim), dtype=img_emb.dtype)
    out_img[indices] = img_emb
    out_text = None
    if text_emb is not None:
        out_text = np.zeros((slots, text_emb.shape[1]), dtype=text_emb.dtype)
        out_text[indices] = text_emb
    present = np.zeros(slots, dtype=bool)
    present[indices] = True
    out_captions = [""] * slots
    for i, caption in zip(indices.tolist(), captions):
        out_captions[i] = caption
    keys = [make_key(shard_id, i, shard_digits, index_digits) for i in range(slots)]
    return AlignedShard(out_img, out_text, keys, out_captions, present)


def aligned_shards(layout: RunLayout) -> list[str]:
    """The shards with aligned embeddings, in order (a shard's parquet is written last, after its npy files)."""
    return [url.rsplit("/", 1)[-1][: -len(".parquet")] for url in list_files(layout.aligned, ".parquet")]


def write_aligned(layout: RunLayout, shard: str, aligned: AlignedShard) -> None:
    """Write the shard's npy files, then its parquet."""
    files = layout.aligned_files(shard)
    write_npy(files["img_emb"], aligned.img_emb)
    if aligned.text_emb is not None:
        write_npy(files["text_emb"], aligned.text_emb)
    table = pa.table({
        INDEX: pa.array(np.arange(len(aligned.keys)), pa.int64()),
        KEY: pa.array(aligned.keys, pa.string()),
        CAPTION: pa.array(aligned.captions, pa.string()),
        PRESENT: pa.array(aligned.present, pa.bool_()),
    })
    write_parquet(files["metadata"], table)


def read_aligned(layout: RunLayout, shard: str, mmap: bool = True) -> AlignedShard:
    """A shard's aligned embeddings (memory-mapped when local)."""
    files = layout.aligned_files(shard)
    meta = read_parquet(files["metadata"]).to_pydict()
    try:
        text_emb = read_npy(files["text_emb"], mmap=mmap)
    except FileNotFoundError:
        text_emb = None
    return AlignedShard(read_npy(files["img_emb"], mmap=mmap), text_emb, meta[KEY], meta[CAPTION],
                        np.asarray(meta[PRESENT], dtype=bool))


def embedding_width(layout: RunLayout) -> Optional[int]:
    """The width of the run's aligned image embeddings (its first shard's), or None before any are written."""
    shards = aligned_shards(layout)
    return int(read_npy(layout.aligned_files(shards[0])["img_emb"], mmap=True).shape[1]) if shards else None
