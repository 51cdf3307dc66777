"""Pass 1 of the filter, one Ray task per shard: caption rules, CLIP similarity and rank, duplicates inside the
shard, written as the shard's scratch mask; and the mask and ledger record formats both passes write."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.formats.aligned import read_aligned
from pipeline.run.config import FilterConfig
from pipeline.run.layout import DUPLICATE_OF, INDEX, KEEP, KEY, REASON, SIMILARITY, RunLayout
from pipeline.run.ledger import ShardRecord
from pipeline.run.storage import write_parquet
from pipeline.stages.filter.rules import (NEAR_DUPLICATE, caption_ranks, first_of_each_group, load_language_model, low_rank,
                                          low_similarity, normalized)

log = logging.getLogger(__name__)


class ShardFilter:
    """Pass 1 for one shard: caption rules, CLIP similarity, duplicates inside the shard; a scratch mask."""

    def __init__(self, config: FilterConfig, root: str):
        self.config, self.layout = config, RunLayout(root)

    def __call__(self, shard: str) -> ShardRecord:
        started = time.time()
        aligned = read_aligned(self.layout, shard, mmap=False)
        rows = len(aligned.keys)
        reasons: list[Optional[str]] = [None if present else "absent" for present in aligned.present]
        for i, caption in enumerate(aligned.captions):
            if reasons[i] is None:
                reasons[i] = self.caption_reason(caption)
        image = normalized(aligned.img_emb)
        text = normalized(aligned.text_emb) if aligned.text_emb is not None else None
        similarity = (image * text).sum(axis=1) if text is not None else np.full(rows, np.nan, dtype=np.float32)
        for field in ("min_similarity", "max_caption_rank"):
            if getattr(self.config, field) is not None and text is None:
                raise ValueError(f"filter.{field} is set but shard {shard} has no text embeddings")

        def undecided() -> np.ndarray:
            return np.asarray([i for i in range(rows) if reasons[i] is None], dtype=np.int64)

        if self.config.min_similarity is not None:
            for i in np.nonzero(similarity < self.config.min_similarity)[0]:
                reasons[i] = reasons[i] or low_similarity(self.config.min_similarity)
        if self.config.max_caption_rank is not None:
            still_kept = undecided()
            ranks = caption_ranks(image, text, aligned.captions, still_kept)
            for i in still_kept[ranks > self.config.max_caption_rank]:
                reasons[i] = low_rank(self.config.max_caption_rank)
        duplicate_of: list[Optional[str]] = [None] * rows
        if self.config.duplicate_threshold is not None:
            candidates = undecided()
            for i, first in first_of_each_group(image[candidates], self.config.duplicate_threshold).items():
                reasons[candidates[i]] = NEAR_DUPLICATE
                duplicate_of[candidates[i]] = aligned.keys[candidates[first]]
        write_parquet(self.layout.filter_first_pass(shard), mask_table(aligned.keys, reasons, similarity, duplicate_of))
        return shard_record(shard, reasons, time.time() - started)

    def caption_reason(self, caption: str) -> Optional[str]:
        """Why a caption is dropped (None: it is not)."""
        text = caption.strip()
        if len(text) < self.config.min_caption_chars:
            return "caption too short"
        if self.config.max_caption_chars is not None and len(text) > self.config.max_caption_chars:
            return "caption too long"
        if self.config.language_model:
            label, score = self.language(text)
            if label not in self.config.languages or score < self.config.min_language_score:
                return "caption language"
        return None

    def language(self, text: str) -> tuple[str, float]:
        """fastText's most likely language of `text` and its probability."""
        # the model's own predict() breaks on NumPy 2 (np.array(copy=False)); its C++ binding does not
        found = load_language_model(self.config.language_model).f.predict(text.replace("\n", " "), 1, 0.0, "replace")
        if not found:
            return "", 0.0
        score, label = found[0]
        return label.replace("__label__", ""), float(score)


def mask_table(keys: list[str], reasons: list[Optional[str]], similarity: np.ndarray,
               duplicate_of: list[Optional[str]]) -> pa.Table:
    """The filter's columns for one shard, one row per aligned row."""
    return pa.table({
        INDEX: pa.array(np.arange(len(keys)), pa.int64()),
        KEY: pa.array(keys, pa.string()),
        KEEP: pa.array([r is None for r in reasons], pa.bool_()),
        REASON: pa.array(reasons, pa.string()),
        SIMILARITY: pa.array(np.asarray(similarity, dtype=np.float32)),
        DUPLICATE_OF: pa.array(duplicate_of, pa.string()),
    })


def shard_record(shard: str, reasons: list[Optional[str]], seconds: float) -> ShardRecord:
    """Rows in: the present ones; written: kept; failed: dropped, by reason."""
    counts = Counter(r for r in reasons if r != "absent")
    kept = counts.pop(None, 0)
    return ShardRecord(shard, kept + sum(counts.values()), kept, dict(counts), round(seconds, 3))
