"""The run's held-out rows as written: `<root>/holdout.parquet` (shard, index, key, caption) and the settings it was drawn with.

Drawn once by pipeline/stages/holdout.py; read here by training, evaluation and the filter's check of its CLIP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.run.layout import CAPTION, INDEX, KEY, SHARD, RunLayout

SETTINGS = b"dalle2.holdout"  # the parquet metadata key holding the settings the split was drawn with


@dataclass(frozen=True)
class Holdout:
    """Held-out rows as (shard, row index) pairs with their keys and captions, in shard then index order."""

    shards: list[str]
    indices: list[int]
    keys: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.indices)

    def rows(self) -> dict[str, np.ndarray]:
        """{shard: its held-out row indices, ascending}."""
        out: dict[str, list[int]] = {}
        for shard, index in zip(self.shards, self.indices):
            out.setdefault(shard, []).append(index)
        return {shard: np.asarray(sorted(found), dtype=np.int64) for shard, found in out.items()}

    def distinct_captions(self) -> list[str]:
        """Each held-out caption once, in row order."""
        return list(dict.fromkeys(self.captions))


def read_holdout(root: str) -> Optional[tuple[Holdout, dict]]:
    """The run's split and the settings it was drawn with (None before one is drawn)."""
    from pipeline.run.storage import exists, read_parquet

    path = RunLayout(root).holdout
    if not exists(path):
        return None
    table = read_parquet(path)
    drawn_with = json.loads((table.schema.metadata or {}).get(SETTINGS, b"{}"))
    columns = table.to_pydict()
    return Holdout(columns[SHARD], columns[INDEX], columns[KEY], columns[CAPTION]), drawn_with


def load_holdout(root: str) -> Holdout:
    """The run's split; an empty one where none was drawn (a run made before splits, or holdout.rows: 0)."""
    found = read_holdout(root)
    return found[0] if found else Holdout([], [], [], [])
