"""Streaming loaders for training: batches from the aligned embeddings (and the shards' images).

An epoch's plan is deterministic in (seed, epoch): shards in a permuted order, the present samples
of each shard in a permuted order, padded by wrapping to a multiple of the world size, then cut
into one contiguous slice per rank. Every rank therefore sees the same number of samples and of
batches, the padding is counted (`padded`), and a resumed run can skip to any batch of any epoch.
Each rank streams its slice shard by shard (embeddings memory-mapped, images read from the tar
without holding it) through a small shuffle buffer, so a data set is never held in memory.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from .aligned import aligned_shards, read_aligned
from .layout import INDEX, PRESENT, RunLayout, parse_key
from .shard_reader import image_of, iter_samples
from .storage import read_parquet


@dataclass
class SamplePlan:
    """The samples a loader draws from: for each shard, the indices of its present samples."""

    indices: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.indices.values())

    @classmethod
    def from_aligned(cls, root: str, filtered: bool = False) -> "SamplePlan":
        """Every present aligned row; with `filtered`, only the rows the filter stage kept."""
        from .filter import kept_indices

        layout = RunLayout(root)
        shards = aligned_shards(layout)
        if not shards:
            raise FileNotFoundError(f"no aligned embeddings under {layout.aligned}: run embed (or reorder) first")
        indices = {}
        for shard in shards:
            if filtered:
                indices[shard] = kept_indices(root, shard)
                continue
            meta = read_parquet(layout.aligned_files(shard)["metadata"], columns=[INDEX, PRESENT]).to_pydict()
            indices[shard] = np.asarray([i for i, p in zip(meta[INDEX], meta[PRESENT]) if p], dtype=np.int64)
        return cls(indices)

    @classmethod
    def from_shards(cls, root: str) -> "SamplePlan":
        """Every downloaded sample (status success in the shards' parquets), for training without embeddings."""
        from .embed import complete_shards

        layout = RunLayout(root)
        shards = complete_shards(layout)
        if not shards:
            raise FileNotFoundError(f"no downloaded shards under {layout.shards}: run download first")
        indices = {}
        for shard in shards:
            meta = read_parquet(layout.shard_parquet(shard), columns=["key", "status"]).to_pydict()
            digits = len(meta["key"][0]) - len(shard) if meta["key"] else 1
            indices[shard] = np.asarray(sorted(parse_key(k, digits)[1] for k, s in zip(meta["key"], meta["status"])
                                               if s == "success"), dtype=np.int64)
        return cls(indices)

    def split(self, holdout: int) -> tuple["SamplePlan", "SamplePlan"]:
        """(train, eval): the last `holdout` samples in shard order are held out of training."""
        train, held = {}, {}
        remaining = holdout
        for shard in sorted(self.indices, reverse=True):
            idx = self.indices[shard]
            take = min(remaining, len(idx))
            if take:
                held[shard] = idx[len(idx) - take:]
            train[shard] = idx[: len(idx) - take]
            remaining -= take
        return SamplePlan({s: v for s, v in sorted(train.items()) if len(v)}), SamplePlan(dict(sorted(held.items())))

    def rank_slice(self, rank: int, world_size: int, epoch: int, seed: int) -> tuple[list[tuple[str, np.ndarray]], int]:
        """This rank's samples for `epoch` as (shard, indices) runs, and how many were padding."""
        rng = np.random.default_rng([seed, epoch])
        shards = list(self.indices)
        flat_shard, flat_index = [], []
        for s in rng.permutation(len(shards)):
            idx = rng.permutation(self.indices[shards[s]])
            flat_shard.extend([s] * len(idx))
            flat_index.append(idx)
        if not flat_shard:
            raise ValueError("the sample plan is empty")
        flat_shard, flat_index = np.asarray(flat_shard), np.concatenate(flat_index)
        per_rank = math.ceil(len(flat_shard) / world_size)
        padded = per_rank * world_size - len(flat_shard)
        wrap = np.arange(per_rank * world_size) % len(flat_shard)
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        mine_shard, mine_index = flat_shard[wrap[lo:hi]], flat_index[wrap[lo:hi]]
        runs, start = [], 0
        for end in range(1, len(mine_shard) + 1):
            if end == len(mine_shard) or mine_shard[end] != mine_shard[start]:
                runs.append((shards[mine_shard[start]], mine_index[start:end]))
                start = end
        return runs, padded


class ShardedBatches:
    """Batches of one rank. Subclasses say how a run of (shard, indices) becomes samples."""

    def __init__(self, root: str, plan: SamplePlan, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 256):
        self.layout, self.plan, self.batch_size = RunLayout(root), plan, batch_size
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer

    def samples_per_epoch(self) -> int:
        """Samples each rank sees per epoch (equal on every rank)."""
        return math.ceil(self.plan.size / self.world_size)

    def batches_per_epoch(self) -> int:
        return math.ceil(self.samples_per_epoch() / self.batch_size)

    def samples(self, shard: str, indices: np.ndarray) -> Iterator[dict]:
        raise NotImplementedError

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """The batches of `epoch` for this rank, starting after `skip_batches` of them."""
        runs, _ = self.plan.rank_slice(self.rank, self.world_size, epoch, self.seed)
        rng = random.Random(hash((self.seed, epoch, self.rank)) & 0xFFFFFFFF)
        buffer: list[dict] = []
        batch: list[dict] = []
        produced = 0

        def emit(sample: dict) -> Optional[dict]:
            nonlocal produced
            batch.append(sample)
            if len(batch) == self.batch_size:
                produced += 1
                out = list(batch)
                batch.clear()
                return self.collate(out) if produced > skip_batches else {}
            return None

        for shard, indices in runs:
            for sample in self.samples(shard, indices):
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    out = emit(buffer.pop(rng.randrange(len(buffer))))
                    if out:
                        yield out
        rng.shuffle(buffer)
        for sample in buffer:
            out = emit(sample)
            if out:
                yield out
        if batch and produced + 1 > skip_batches:
            yield self.collate(batch)

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        out = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return out


class EmbeddingBatches(ShardedBatches):
    """(text_embed, image_embed, caption) batches from the aligned layout, for the prior."""

    def samples(self, shard: str, indices: np.ndarray) -> Iterator[dict]:
        aligned = read_aligned(self.layout, shard)
        if aligned.text_emb is None:
            raise ValueError(f"shard {shard} has no text embeddings (aligned/text_emb): the prior needs them")
        for i in indices.tolist():
            yield {"text_embed": torch.from_numpy(np.asarray(aligned.text_emb[i], dtype=np.float32)),
                   "image_embed": torch.from_numpy(np.asarray(aligned.img_emb[i], dtype=np.float32)),
                   "caption": aligned.captions[i], "key": aligned.keys[i]}


class ShardImageBatches(ShardedBatches):
    """(image, caption) batches straight from the webdataset shards (CLIP training needs no embeddings)."""

    def __init__(self, *args, image_size: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_size = image_size

    def extra(self, shard: str):
        """Per-shard data joined to each sample (none here); returns (lookup, index digits or None)."""
        return None, None

    def samples(self, shard: str, indices: np.ndarray) -> Iterator[dict]:
        from PIL import Image

        joined, index_digits = self.extra(shard)
        wanted: dict[int, int] = {}
        for i in indices.tolist():  # a sample wrapped in twice (padding) is yielded twice
            wanted[i] = wanted.get(i, 0) + 1
        for key, fields in iter_samples(self.layout.shard_tar(shard)):
            index = parse_key(key, index_digits or len(key) - len(shard))[1]
            if index not in wanted:
                continue
            with Image.open(io.BytesIO(image_of(fields))) as image:
                image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
            sample = {"image": pixels, "caption": fields.get("txt", b"").decode("utf-8", errors="replace"), "key": key}
            if joined is not None:
                sample["image_embed"] = torch.from_numpy(np.asarray(joined.img_emb[index], np.float32))
            for _ in range(wanted.pop(index)):
                yield sample
        if wanted:
            raise ValueError(f"shard {shard}: samples {sorted(wanted)[:5]} are present in aligned/ but not in its tar")


class ImageBatches(ShardImageBatches):
    """(image, image_embed, caption) batches: webdataset images joined with their aligned embeddings."""

    def extra(self, shard: str):
        aligned = read_aligned(self.layout, shard)
        return aligned, (len(aligned.keys[0]) - len(shard) if aligned.keys else 1)
