"""What a training job reads, planned from per-shard counts: which rows of which shards (all, the training part, the
held-out part), each epoch's permuted order cut into one contiguous slice per rank.

An epoch's plan is deterministic in (seed, epoch): shards in a permuted order, the present samples of each shard in a
permuted order, padded by wrapping to a multiple of the world size, then cut into one contiguous slice per rank.
Every rank therefore sees the same number of samples and of batches, the padding is counted (`padded`), and a resumed
run can skip to any batch of any epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.formats.aligned import aligned_shards
from pipeline.formats.queries import complete_shards, kept_indices, usable_indices, written_per_shard
from pipeline.run.layout import DOWNLOAD, EMBED, FILTER, REORDER, RunLayout


Part = Literal["all", "train", "held_out"]


@dataclass(frozen=True)
class RowSource:
    """Where a shard's usable row indices come from, and how many the stage that made them counted."""

    root: str
    kind: Literal["aligned", "filtered", "downloaded"]
    counts: dict[str, int]  # usable rows per shard, from the stage's ledger summary (or its files)
    # "train": without the run's held-out rows (pipeline/formats/holdout.py); "held_out": those alone; "all": every row
    part: Part = "all"
    held_out: dict[str, np.ndarray] = field(default_factory=dict)  # {shard: held-out row indices}

    def read(self, shard: str) -> np.ndarray:
        """The shard's usable row indices in this part, ascending, read from its files."""
        indices = self.read_all(shard)
        if self.part == "all":
            return indices
        held = np.isin(indices, self.held_out.get(shard, np.empty(0, dtype=np.int64)))
        return indices[held] if self.part == "held_out" else indices[~held]

    def read_all(self, shard: str) -> np.ndarray:
        """The shard's usable row indices, ascending, read from its files."""
        if self.kind == "filtered":
            return kept_indices(self.root, shard)
        return usable_indices(RunLayout(self.root), shard, self.kind)

    def __call__(self, shard: str) -> np.ndarray:
        """The shard's usable row indices; refused when they are not as many as the plan counted (every rank
        plans from the counts, so a shard rewritten since would give ranks different batches)."""
        indices = self.read(shard)
        if len(indices) != self.counts[shard]:
            raise ValueError(f"shard {shard}: its {self.kind} files list {len(indices)} usable rows but the "
                             f"{SUMMARY_STAGE[self.kind]} ledger summary counted {self.counts[shard]}: re-run "
                             "that stage so its summary matches the files")
        return indices


# the stage whose ledger summary counts each kind of row (written = usable rows of the shard)
SUMMARY_STAGE = {"filtered": FILTER, "aligned": f"{EMBED} (or {REORDER})", "downloaded": DOWNLOAD}


def planned_counts(root: str, kind: str, shards: list[str]) -> dict[str, int]:
    """Usable rows of each shard: from the stages' ledger summaries (one read each), files read (concurrently)
    only for shards no summary counts (data made elsewhere, or a stage that has not summarised yet)."""
    from concurrent.futures import ThreadPoolExecutor

    layout = RunLayout(root)
    stages = {"filtered": [FILTER], "aligned": [EMBED, REORDER], "downloaded": [DOWNLOAD]}[kind]
    counted: dict[str, set[int]] = {}
    for stage in stages:
        per_shard = written_per_shard(layout, stage)
        for s in shards:
            if s in per_shard:
                counted.setdefault(s, set()).add(per_shard[s])
    # a shard two stages counted differently (embed, then reorder over it) is read, not guessed
    counts = {s: next(iter(n)) for s, n in counted.items() if len(n) == 1}
    uncounted = [s for s in shards if s not in counts]
    source = RowSource(root, kind, {})
    with ThreadPoolExecutor(max_workers=16) as pool:
        counts.update(zip(uncounted, (len(i) for i in pool.map(source.read, uncounted))))
    return {s: counts[s] for s in shards}


@dataclass
class SamplePlan:
    """The samples a loader draws from: how many from each shard, read when a rank needs that shard as
    `source(shard)[first : first + count]`. Planning needs the counts alone, so every rank plans an epoch from
    them and reads row indices only for the shards in its own slice."""

    counts: dict[str, int]
    source: RowSource
    first: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(self.counts.values())

    def indices(self, shard: str) -> np.ndarray:
        """The row indices this plan draws from `shard`."""
        start = self.first.get(shard, 0)
        return self.source(shard)[start : start + self.counts[shard]]

    @classmethod
    def from_aligned(cls, root: str, filtered: bool = False, part: Part = "all") -> "SamplePlan":
        """Every present aligned row of `part` (training: without the run's held-out rows); with `filtered`, only
        the rows the filter stage kept."""
        layout = RunLayout(root)
        shards = aligned_shards(layout)
        if not shards:
            raise FileNotFoundError(f"no aligned embeddings under {layout.aligned}: run embed (or reorder) first")
        return cls.of_part(root, "filtered" if filtered else "aligned", shards, part)

    @classmethod
    def from_shards(cls, root: str, part: Part = "all") -> "SamplePlan":
        """Every downloaded sample of `part` (status success in the shards' parquets), for training without
        embeddings."""
        layout = RunLayout(root)
        shards = complete_shards(layout)
        if not shards:
            raise FileNotFoundError(f"no downloaded shards under {layout.shards}: run download first")
        return cls.of_part(root, "downloaded", shards, part)

    @classmethod
    def of_part(cls, root: str, kind: str, shards: list[str], part: Part) -> "SamplePlan":
        """The plan of one part: the counts of the shards holding held-out rows are read from their files (a few,
        pipeline/formats/holdout.py), every other shard's from its ledger summary."""
        from pipeline.formats.holdout import load_holdout

        counts = planned_counts(root, kind, shards)
        held_out = load_holdout(root).rows() if part != "all" else {}
        source = RowSource(root, kind, counts, part, held_out)
        if part == "held_out":
            counts = {s: counts[s] for s in shards if s in held_out}
        mixed = [s for s in held_out if s in counts]
        if mixed:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=16) as pool:
                counts.update(zip(mixed, (len(i) for i in pool.map(source.read, mixed))))
            source = RowSource(root, kind, counts, part, held_out)
        return cls({s: n for s, n in counts.items() if n}, source)

    def head(self, count: int) -> "SamplePlan":
        """The first `count` samples in shard order (an evaluation's share of the held-out rows)."""
        taken: dict[str, int] = {}
        for shard in sorted(self.counts):
            if count <= 0:
                break
            taken[shard] = min(count, self.counts[shard])
            count -= taken[shard]
        return SamplePlan(taken, self.source, self.first)

    def rank_slice(self, rank: int, world_size: int, epoch: int, seed: int) -> tuple[list[tuple[str, np.ndarray]], int]:
        """This rank's samples for `epoch` as (shard, indices) runs, and how many were padding.

        The epoch's order: shards permuted, each shard's samples permuted by a generator of its own, the whole
        wrapped to a multiple of `world_size` and cut into one contiguous slice per rank. Only the counts are
        needed to find the shards of a slice, so a rank reads the indices of its own shards alone."""
        shards = list(self.counts)
        counts = np.asarray([self.counts[s] for s in shards], dtype=np.int64)
        total = int(counts.sum())
        if not total:
            raise ValueError("the sample plan is empty")
        order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        ends = np.cumsum(counts[order])
        per_rank = math.ceil(total / world_size)
        padded = per_rank * world_size - total
        cuts: list[tuple[int, int, int]] = []  # (shard, first, count) of this rank's slice, in order
        position, stop = rank * per_rank, (rank + 1) * per_rank
        while position < stop:
            at = position % total  # past the end: the padding wraps to the start
            j = int(np.searchsorted(ends, at, side="right"))
            shard = int(order[j])
            within = at - int(ends[j] - counts[shard])
            take = min(stop - position, int(counts[shard]) - within)
            cuts.append((shard, within, take))
            position += take
        from concurrent.futures import ThreadPoolExecutor

        mine = sorted({shard for shard, _, _ in cuts})
        with ThreadPoolExecutor(max_workers=16) as pool:  # the slice's shards read at once, not one by one
            permuted = dict(zip(mine, pool.map(
                lambda s: np.random.default_rng([seed, epoch, s]).permutation(self.indices(shards[s])), mine)))
        return [(shards[shard], permuted[shard][first : first + take]) for shard, first, take in cuts], padded
