"""Streaming batches for training: each rank streams its slice of the epoch's plan shard by shard (embeddings
memory-mapped, images read from the tar without holding it) through a small shuffle buffer, so a data set is never
held in memory; a resumed rank skips the batches it trained on without decoding them."""

from __future__ import annotations

import io
import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from pipeline.formats.aligned import read_aligned
from pipeline.formats.shard_reader import image_of, iter_samples
from pipeline.loaders.plan import SamplePlan
from pipeline.loaders.shares import Segment, batches_of, emission_order, share_of
from pipeline.run.layout import RunLayout, parse_key


class ShardedBatches:
    """Batches of one rank. Subclasses say how a run of (shard, indices) becomes samples."""

    def __init__(self, root: str, plan: SamplePlan, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 256, drop_last: bool = False):
        self.layout, self.plan, self.batch_size = RunLayout(root), plan, batch_size
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        # a contrastive loss learns little from an epoch's last few samples against each other (a batch of 4
        # reads ~0 loss yet takes a full step): CLIP training drops them, as open_clip's training loader does,
        # unless a rank's epoch has no full batch at all
        self.drop_last = drop_last and self.samples_per_epoch() >= batch_size

    def samples_per_epoch(self) -> int:
        """Samples each rank sees per epoch (equal on every rank)."""
        return math.ceil(self.plan.size / self.world_size)

    def batches_per_epoch(self, earlier: Sequence[Segment] = (), epoch: int = 0) -> int:
        """Batches of `epoch`: those trained in its `earlier` segments (on other world sizes) and this rank's."""
        if not earlier:
            return batches_of(self.samples_per_epoch(), self.batch_size, self.drop_last)
        # as long on every rank; which padded duplicates an earlier segment trained, and so how many are left, is
        # the epoch's own
        share = self.share(epoch, earlier)[1]
        return sum(batches for _, batches in earlier) + batches_of(len(share), self.batch_size, self.drop_last)

    def share(self, epoch: int, earlier: Sequence[Segment]) -> tuple[int, np.ndarray]:
        """The root world size of `epoch` and this rank's share of it (pipeline/loaders/shares.py)."""
        return share_of(self.rank, self.plan.size, earlier, self.world_size, self.batch_size, self.shuffle_buffer,
                        self.seed, epoch)

    def samples(self, shard: str, indices: np.ndarray, needed: np.ndarray) -> Iterator[Optional[dict]]:
        """One item per entry of `indices`, in the order they are read: the sample, or None (not decoded) for
        the k-th one read when `needed[k]` is False."""
        raise NotImplementedError

    def epoch(self, epoch: int, skip_batches: int = 0, earlier: Sequence[Segment] = ()) -> Iterator[dict]:
        """The batches of `epoch` for this rank, starting after `skip_batches` of them; after `earlier` segments of
        the epoch trained on other world sizes, this rank's share of what they left. Samples go through a
        shuffle buffer; the order they leave it depends only on how many there are, so it is computed first and
        a resumed rank neither opens the shards nor decodes the samples of the batches it skips."""
        roots, share = self.share(epoch, earlier)
        total = len(share)
        order = emission_order(total, self.shuffle_buffer, self.seed, epoch, self.rank, len(earlier))
        end = min(batches_of(total, self.batch_size, self.drop_last) * self.batch_size, total)
        first = min(skip_batches * self.batch_size, end)
        needed = np.zeros(total, dtype=bool)
        needed[order[first:end]] = True  # nothing else is decoded
        held: dict[int, dict] = {}  # read, not yet out (at most the buffer's size)
        batch: list[dict] = []
        out = first

        def ready() -> Iterator[dict]:
            nonlocal out
            while out < end and order[out] in held:
                batch.append(held.pop(order[out]))
                out += 1
                if len(batch) == self.batch_size:
                    yield self.seeded(self.collate(batch), epoch)
                    batch.clear()

        per_root = math.ceil(self.plan.size / roots)
        for root in range(roots):  # the share's samples, read in the root ranks' sequences (in share order)
            items = np.flatnonzero((share >= root * per_root) & (share < (root + 1) * per_root))
            if not needed[items].any():
                continue
            item_at = np.full(per_root, -1, dtype=np.int64)  # a root read position -> its item in the share
            item_at[share[items] - root * per_root] = items
            wanted = np.zeros(per_root, dtype=bool)
            wanted[share[items] - root * per_root] = needed[items]
            runs, _ = self.plan.rank_slice(root, roots, epoch, self.seed)
            position = 0
            for shard, indices in runs:
                if wanted[position : position + len(indices)].any():
                    for k, sample in enumerate(self.samples(shard, indices, wanted[position : position + len(indices)])):
                        if sample is not None:
                            held[int(item_at[position + k])] = sample
                            yield from ready()
                position += len(indices)
        yield from ready()
        if batch:
            yield self.seeded(self.collate(batch), epoch)

    def seeded(self, batch: dict, epoch: int) -> dict:
        """The batch with each sample's seed for its random draws in training (a function of its key, the epoch
        and the job's seed: dalle2/row_random.py), so the split over ranks does not change them."""
        from dalle2.row_random import sample_seeds

        return {**batch, "seed": sample_seeds(batch["key"], self.seed, epoch)} if "key" in batch else batch

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        out = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return out


class EmbeddingBatches(ShardedBatches):
    """(text_embed, image_embed, caption) batches from the aligned layout, for the prior."""

    def samples(self, shard: str, indices: np.ndarray, needed: np.ndarray) -> Iterator[Optional[dict]]:
        aligned = read_aligned(self.layout, shard)
        if aligned.text_emb is None:
            raise ValueError(f"shard {shard} has no text embeddings (aligned/text_emb): the prior needs them")
        for i, wanted in zip(indices.tolist(), needed.tolist()):
            yield None if not wanted else {"text_embed": torch.from_numpy(np.asarray(aligned.text_emb[i], dtype=np.float32)),
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

    def samples(self, shard: str, indices: np.ndarray, needed: np.ndarray) -> Iterator[Optional[dict]]:
        from PIL import Image

        joined, index_digits = self.extra(shard)
        wanted: dict[int, int] = {}
        for i in indices.tolist():  # a sample wrapped in twice (padding) is yielded twice
            wanted[i] = wanted.get(i, 0) + 1
        read = 0
        for key, fields in iter_samples(self.layout.shard_tar(shard)):
            index = parse_key(key, index_digits or len(key) - len(shard))[1]
            if index not in wanted:
                continue
            copies = wanted.pop(index)
            if not needed[read : read + copies].any():  # read in a batch a resumed rank skips: not decoded
                read += copies
                yield from [None] * copies
                continue
            with Image.open(io.BytesIO(image_of(fields))) as image:
                image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
            sample = {"image": pixels, "caption": fields.get("txt", b"").decode("utf-8", errors="replace"), "key": key}
            if joined is not None:
                sample["image_embed"] = torch.from_numpy(np.asarray(joined.img_emb[index], np.float32))
            for k in range(copies):
                yield sample if needed[read + k] else None
            read += copies
        if wanted:
            raise ValueError(f"shard {shard}: samples {sorted(wanted)[:5]} are present in aligned/ but not in its tar")


class ImageBatches(ShardImageBatches):
    """(image, image_embed, caption) batches: webdataset images joined with their aligned embeddings."""

    def extra(self, shard: str):
        aligned = read_aligned(self.layout, shard)
        return aligned, (len(aligned.keys[0]) - len(shard) if aligned.keys else 1)
