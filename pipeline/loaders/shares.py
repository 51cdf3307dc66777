"""Which samples of an epoch each rank reads, when the epoch was begun on another number of workers.

An epoch's samples are cut into one read sequence per rank of the world size it started with (its *root* ranks,
`SamplePlan.rank_slice`); each rank consumes its sequence through a shuffle buffer. A resumed job that runs on
another number of workers pools what every rank had not yet consumed, in root-rank and read order, and cuts the
pool into one contiguous share per new rank; a new rank reads the root ranks' sequences and decodes its share
alone. A *segment* is (world size, batches each rank trained at it); an epoch resumed twice has several.

Every rank computes every share from the sample count alone, so no rank reads a file to know what another trained.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np

Segment = tuple[int, int]  # (world size, batches each of its ranks trained)


def shuffle_order(count: int, buffer_size: int, rng: random.Random) -> np.ndarray:
    """The order `count` samples read in sequence leave a shuffle buffer of `buffer_size`: out[k] is the read
    position of the k-th sample out. Once the buffer is full each new sample sends a random one out; the rest
    leave shuffled at the end."""
    buffer: list[int] = []
    out: list[int] = []
    for position in range(count):
        buffer.append(position)
        if len(buffer) >= buffer_size:
            out.append(buffer.pop(rng.randrange(len(buffer))))
    rng.shuffle(buffer)
    return np.asarray(out + buffer, dtype=np.int64)


def emission_order(count: int, buffer_size: int, seed: int, epoch: int, rank: int, segment: int) -> np.ndarray:
    """The order a rank's share of `count` samples leaves its shuffle buffer in segment `segment` of `epoch`."""
    # the first segment keeps the key it always had, so a run that never changes its workers trains as before
    key = (seed, epoch, rank) if segment == 0 else (seed, epoch, rank, segment)
    return shuffle_order(count, buffer_size, random.Random(hash(key) & 0xFFFFFFFF))


def cut(pool: np.ndarray, world_size: int) -> list[np.ndarray]:
    """`pool` in `world_size` contiguous shares of equal length, the last ones wrapped to the start when it does not
    divide (so every rank trains as many batches)."""
    per_rank = math.ceil(len(pool) / world_size)
    padded = np.resize(pool, per_rank * world_size) if len(pool) else pool
    return [np.sort(padded[rank * per_rank:(rank + 1) * per_rank]) for rank in range(world_size)]


def shares(samples: int, segments: Sequence[Segment], world_size: int, batch_size: int, buffer_size: int,
           seed: int, epoch: int) -> tuple[int, list[np.ndarray]]:
    """The root world size of an epoch of `samples` and, for each of `world_size` ranks after `segments`, its share:
    sorted ids into the root ranks' concatenated read sequences (root r's read position p is r * per_root + p, with
    per_root = ceil(samples / roots), its padding included)."""
    roots = segments[0][0] if segments else world_size
    owned = [root_sequence(samples, roots, r) for r in range(roots)]
    for index, (size, batches) in enumerate(segments):
        if len(owned) != size:
            raise ValueError(f"segment {index} of the epoch has {size} workers, its shares were cut for {len(owned)}")
        trained = [mine[emission_order(len(mine), buffer_size, seed, epoch, rank, index)[:batches * batch_size]]
                   for rank, mine in enumerate(owned)]
        # what no rank trained (a sample two shares held as padding is done once either trained it)
        left = np.setdiff1d(np.concatenate(owned), np.concatenate(trained))
        following = segments[index + 1][0] if index + 1 < len(segments) else world_size
        owned = cut(left, following)
    return roots, owned


def share_of(rank: int, samples: int, segments: Sequence[Segment], world_size: int, batch_size: int,
             buffer_size: int, seed: int, epoch: int) -> tuple[int, np.ndarray]:
    """The root world size and rank `rank`'s share, as `shares` gives it; an epoch as it began (no segments) is the
    rank's own read sequence, found without building every rank's."""
    if not segments:
        return world_size, root_sequence(samples, world_size, rank)
    roots, owned = shares(samples, segments, world_size, batch_size, buffer_size, seed, epoch)
    return roots, owned[rank]


def root_sequence(samples: int, roots: int, rank: int) -> np.ndarray:
    """The ids of root rank `rank`'s read sequence: its ceil(samples / roots) positions, padding included."""
    per_root = math.ceil(samples / roots)
    return np.arange(rank * per_root, (rank + 1) * per_root, dtype=np.int64)


def batches_of(count: int, batch_size: int, drop_last: bool) -> int:
    """Batches a share of `count` samples makes (its last short one dropped with `drop_last`)."""
    return count // batch_size if drop_last else math.ceil(count / batch_size)
