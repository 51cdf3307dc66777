"""The streaming loaders: equal batches per rank, sample-level shuffle, nothing lost, resumable."""

import numpy as np
import torch
import pytest

from pipeline.loaders.batches import EmbeddingBatches, ImageBatches

from pipeline.loaders.plan import SamplePlan
from tests.runs import make_training_run


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loaders") / "run")
    make_training_run(root, count=50, per_shard=16, size=32, dim=8)
    return root


def captions_of(loader, epoch, skip=0):
    return [c for batch in loader.epoch(epoch, skip_batches=skip) for c in batch["caption"]]


def test_every_rank_gets_the_same_batches_and_together_all_samples(run_root):
    plan = SamplePlan.from_aligned(run_root)
    assert plan.size == 50
    loaders = [EmbeddingBatches(run_root, plan, batch_size=8, rank=r, world_size=3, seed=1, shuffle_buffer=8) for r in range(3)]
    seen = [captions_of(loader, epoch=0) for loader in loaders]
    assert [len(s) for s in seen] == [17, 17, 17]  # 50 samples padded by 1 to 51
    assert all(loader.batches_per_epoch() == 3 for loader in loaders)
    _, padded = plan.rank_slice(0, 3, 0, 1)
    assert padded == 1
    all_captions = sorted(c for s in seen for c in s)
    assert len(set(all_captions)) == len({c for batch in EmbeddingBatches(run_root, plan, 64).epoch(0) for c in batch["caption"]})


def test_epochs_shuffle_at_sample_level_and_resume_skips_exactly(run_root):
    plan = SamplePlan.from_aligned(run_root)
    loader = EmbeddingBatches(run_root, plan, batch_size=5, seed=3, shuffle_buffer=10)
    first, second = captions_of(loader, 0), captions_of(loader, 1)
    assert sorted(first) == sorted(second) and first != second
    assert captions_of(loader, 0) == first  # deterministic per (seed, epoch)
    assert captions_of(loader, 0, skip=4) == first[20:]  # resume after 4 batches: no sample twice


def test_drop_last_trains_on_full_batches_only_and_resumes_into_them(run_root):
    # CLIP's contrastive loss: 50 samples at batch 8 are 6 full batches; the 2 left over are neither yielded nor read
    plan = SamplePlan.from_aligned(run_root)
    kept = CountingEmbeddings(run_root, plan, batch_size=8, seed=3, shuffle_buffer=10)
    dropping = CountingEmbeddings(run_root, plan, batch_size=8, seed=3, shuffle_buffer=10, drop_last=True)
    assert kept.batches_per_epoch() == 7 and dropping.batches_per_epoch() == 6
    everything = captions_of(kept, 0)
    CountingEmbeddings.decoded = 0
    batches = list(dropping.epoch(0))
    assert [len(b["caption"]) for b in batches] == [8] * 6 and CountingEmbeddings.decoded == 48
    assert [c for b in batches for c in b["caption"]] == everything[:48]  # the same order, short of the last two
    assert captions_of(dropping, 0, skip=4) == everything[32:48]
    # a rank whose epoch has no full batch keeps its partial one rather than training on nothing
    small = EmbeddingBatches(run_root, plan, batch_size=8, rank=0, world_size=8, drop_last=True)
    assert small.batches_per_epoch() == 1 and len(captions_of(small, 0)) == 7


class CountingEmbeddings(EmbeddingBatches):
    """Counts the shards it opens and the samples it hands out (decodes)."""

    opened: list = []
    decoded = 0

    def samples(self, shard, indices, needed):
        CountingEmbeddings.opened.append(shard)
        for sample in super().samples(shard, indices, needed):
            CountingEmbeddings.decoded += sample is not None
            yield sample


@pytest.mark.parametrize("loader_class", [CountingEmbeddings, ImageBatches])
def test_resume_skips_without_opening_or_decoding_what_it_skips(run_root, loader_class, monkeypatch):
    import PIL.Image

    plan = SamplePlan.from_aligned(run_root)
    loader = loader_class(run_root, plan, batch_size=4, seed=5, shuffle_buffer=3)
    keys = [k for batch in loader.epoch(0) for k in batch["key"]]
    CountingEmbeddings.opened, CountingEmbeddings.decoded = [], 0
    images_opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: images_opened.append(1) or real_open(*a, **k))
    resumed = [k for batch in loader.epoch(0, skip_batches=9) for k in batch["key"]]
    assert resumed == keys[36:]  # exactly the batches after the ninth
    if loader_class is CountingEmbeddings:
        assert CountingEmbeddings.decoded == len(keys) - 36
        assert len(CountingEmbeddings.opened) < len(plan.counts)  # the first shards are not even opened
    else:
        assert len(images_opened) == len(keys) - 36  # only the images of the batches it trains on are decoded


def test_a_rank_reads_the_row_indices_of_its_own_shards_only(run_root):
    from pipeline.loaders.plan import RowSource

    plan = SamplePlan.from_aligned(run_root)
    read = []

    class Counting(RowSource):
        def read(self, shard):
            read.append(shard)
            return super().read(shard)

    counted = SamplePlan(plan.counts, Counting(run_root, "aligned", plan.source.counts))
    slices = [counted.rank_slice(rank, 8, 0, 1)[0] for rank in range(8)]
    assert len(read) <= 8 + 4  # 4 shards cut among 8 ranks: each rank reads one or two, not all four
    everything = sorted((s, int(i)) for runs in slices for s, indices in runs for i in indices)
    assert len(everything) == 56  # 50 samples padded to 7 per rank
    assert len(set(everything)) == 50  # every sample, the padding wrapped from the start
    # the counting plan cuts the same slices as the plain one
    assert [(s, i.tolist()) for s, i in slices[3]] == [(s, i.tolist()) for s, i in plan.rank_slice(3, 8, 0, 1)[0]]


def test_a_shard_rewritten_since_its_summary_is_refused_by_name(tmp_path):
    import pyarrow as pa

    from pipeline.run.layout import RunLayout
    from pipeline.run.storage import read_parquet, write_parquet

    root = str(tmp_path / "run")
    make_training_run(root, count=20, per_shard=10, size=16, dim=8)
    plan = SamplePlan.from_aligned(root, filtered=True)
    mask_url = RunLayout(root).filter_mask("00001")
    mask = read_parquet(mask_url)
    write_parquet(mask_url, mask.set_column(mask.schema.get_field_index("keep"), "keep", pa.array([False] * 10)))
    with pytest.raises(ValueError, match="shard 00001: its filtered files list 0 usable rows but the filter ledger"):
        plan.rank_slice(0, 1, 0, 0)


def test_image_batches_join_images_with_their_embeddings(run_root):
    plan = SamplePlan.from_aligned(run_root)
    batch = next(ImageBatches(run_root, plan, batch_size=4, image_size=16, shuffle_buffer=4).epoch(0))
    assert batch["image"].shape == (4, 3, 16, 16) and 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["image_embed"].shape == (4, 8)
    np.testing.assert_allclose(batch["image_embed"].norm(dim=-1).numpy(), 1, atol=1e-2)


def test_evaluation_is_pooled_over_ranks_by_count():
    from jobs.training.worker import pool_metrics, rank_slice

    batch = {"x": list(range(7)), "y": [str(i) for i in range(7)]}
    slices = [rank_slice(batch, rank, 3) for rank in range(3)]
    assert sorted(x for s in slices for x in s["x"]) == list(range(7))  # every held-out row, once
    pooled = pool_metrics([({"a": 1.0}, 3), ({"a": 4.0}, 1), ({}, 0)])
    assert pooled == {"a": (3 * 1.0 + 4.0) / 4}


@pytest.mark.parametrize("rows, world_size", [(7, 3), (8, 2), (2, 3), (5, 1)])
def test_samples_gathered_from_every_rank_come_back_in_held_out_order(rows, world_size):
    from jobs.training.worker import rank_slice, unslice

    batch = {"x": torch.arange(rows * 2).reshape(rows, 2)}
    parts = [rank_slice(batch, rank, world_size)["x"] for rank in range(world_size)]
    # a rank with no rows sends None
    assert torch.equal(unslice([part if len(part) else None for part in parts]), batch["x"])


def test_the_shuffle_buffer_mixes_samples_read_in_shard_order(run_root):
    import random

    from pipeline.loaders.shares import shuffle_order

    plan = SamplePlan.from_aligned(run_root)
    as_read = [k for batch in EmbeddingBatches(run_root, plan, 5, seed=3, shuffle_buffer=1).epoch(0) for k in batch["key"]]
    mixed = [k for batch in EmbeddingBatches(run_root, plan, 5, seed=3, shuffle_buffer=20).epoch(0) for k in batch["key"]]
    assert sorted(mixed) == sorted(as_read) and mixed != as_read
    # shards read one after another come out interleaved
    shard_changes = sum(a[:5] != b[:5] for a, b in zip(mixed, mixed[1:]))
    assert shard_changes > sum(a[:5] != b[:5] for a, b in zip(as_read, as_read[1:])) + 5
    order = shuffle_order(100, 10, random.Random(0))
    assert sorted(order.tolist()) == list(range(100))  # every position out once


def keys_of(loader_class, run_root, plan, world_size: int, earlier=(), batches=None, epoch=0):
    """Each rank's keys of `epoch` after the `earlier` segments (the first `batches` of its batches, or all)."""
    out = []
    for rank in range(world_size):
        loader = loader_class(run_root, plan, batch_size=4, rank=rank, world_size=world_size, seed=5, shuffle_buffer=6)
        taken = []
        for index, batch in enumerate(loader.epoch(epoch, earlier=earlier)):
            if batches is not None and index == batches:
                break
            taken += batch["key"]
        out.append(taken)
    return out


@pytest.mark.parametrize("loader_class", [EmbeddingBatches, ImageBatches])
def test_an_epoch_resumed_on_other_worker_counts_trains_every_sample_once(run_root, loader_class):
    # 48 samples: 2 workers train 3 batches each (24), 1 worker 2 batches (8) of the rest, then 4 workers the 16 left
    plan = SamplePlan.from_aligned(run_root).head(48)
    everything = sorted(k for keys in keys_of(loader_class, run_root, plan, 1) for k in keys)
    assert len(everything) == len(set(everything)) == 48
    two = keys_of(loader_class, run_root, plan, 2, batches=3)
    assert two == [keys[:12] for keys in keys_of(loader_class, run_root, plan, 2)]  # the run as it began
    one = keys_of(loader_class, run_root, plan, 1, earlier=[(2, 3)], batches=2)
    four = keys_of(loader_class, run_root, plan, 4, earlier=[(2, 3), (1, 2)])
    trained = [k for keys in two + one + four for k in keys]
    assert sorted(trained) == everything  # none twice, none skipped
    assert [len(keys) for keys in four] == [4, 4, 4, 4]
    loaders = [loader_class(run_root, plan, batch_size=4, rank=r, world_size=w, seed=5, shuffle_buffer=6)
               for r, w in ((0, 2), (0, 1), (3, 4))]
    assert [loaders[0].batches_per_epoch(), loaders[1].batches_per_epoch([(2, 3)]),
            loaders[2].batches_per_epoch([(2, 3), (1, 2)])] == [6, 3 + 6, 3 + 2 + 1]
    # a resumed share is shuffled too, and a resume inside it skips exactly
    resumed = keys_of(loader_class, run_root, plan, 1, earlier=[(2, 3)])[0]
    assert resumed[:8] == one[0] and sorted(resumed) != resumed
    after = [k for b in loaders[1].epoch(0, skip_batches=1, earlier=[(2, 3)]) for k in b["key"]]
    assert after == resumed[4:]
    # an epoch's count after a padded cut depends on which duplicates it trained: each epoch's own, chained
    for epoch in (0, 1, 2):
        chain = [(2, 3), (5, 1)]  # the 24 left cut 5 ways: 25, one sample twice
        rest = keys_of(loader_class, run_root, plan, 1, earlier=chain, epoch=epoch)[0]
        trained = [k for keys in keys_of(loader_class, run_root, plan, 2, batches=3, epoch=epoch)
                   + keys_of(loader_class, run_root, plan, 5, earlier=chain[:1], batches=1, epoch=epoch) for k in keys]
        assert sorted(set(trained + rest)) == everything and not set(rest) & set(trained)
        assert loaders[1].batches_per_epoch(chain, epoch) == 3 + 1 + -(-len(rest) // 4)
    # 24 left on 5 workers: 5 each, the last share wrapped round to the first sample left
    five = [k for keys in keys_of(loader_class, run_root, plan, 5, earlier=[(2, 3)]) for k in keys]
    assert sorted(set(five)) == sorted(resumed) and len(five) == 25
