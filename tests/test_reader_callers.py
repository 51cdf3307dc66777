"""What the tar reader's callers do with a shard it refuses: the report skips its rows and counts them, the
training loaders fail naming the shard."""

import pytest

from pipeline.run.layout import RunLayout
from pipeline.formats.shard_reader import ShardReadError, iter_samples
from tests.malformed_tars import end, header
from tests.runs import make_training_run


def break_after(tar: str, samples: int) -> list[str]:
    """Rewrite `tar` as its first `samples` samples, then a member declaring an octal size of -1 (the issue's
    balloon); returns the keys cut off."""
    import tarfile

    with tarfile.open(tar) as f:
        members = f.getmembers()
    keys = [key for key, _ in iter_samples(tar)]
    data = open(tar, "rb").read()[: members[2 * samples].offset]  # a jpg and a txt per sample
    with open(tar, "wb") as f:
        f.write(data + header(b"%s.jpg" % keys[samples].encode(), size_field=b"-0000000001\0") + bytes(8192) + end())
    return keys[samples:]


@pytest.fixture()
def broken_run(tmp_path):
    root = str(tmp_path / "run")
    make_training_run(root, count=20, per_shard=10, size=16, dim=8)
    return root, break_after(RunLayout(root).shard_tar("00001"), 3)


def test_the_report_skips_and_counts_the_rows_of_a_shard_it_cannot_read(broken_run):
    from jobs.report import sample_rows

    root, lost = broken_run
    keys = [key for key, _ in iter_samples(RunLayout(root).shard_tar("00000"))]
    rows = [{"shard": "00000", "key": keys[0]}, {"shard": "00001", "key": lost[0]}, {"shard": "00001", "key": lost[-1]},
            {"shard": "00001", "key": "000010"}]  # the last one read before the damage
    undecodable = []
    shown = sample_rows(root, rows, undecodable)
    assert [key for key, _, _ in shown] == [keys[0], "000010"]
    assert undecodable == sorted([lost[0], lost[-1]])


def test_the_image_loader_fails_naming_the_shard(broken_run):
    from pipeline.loaders.batches import ImageBatches
    from pipeline.loaders.plan import SamplePlan

    root, _ = broken_run
    plan = SamplePlan.from_aligned(root)
    loader = ImageBatches(root, plan, batch_size=20, image_size=16, shuffle_buffer=4)
    with pytest.raises(ShardReadError, match=r"shards/00001\.tar: invalid size field b'-0000000001\\x00' in the header"):
        next(loader.epoch(0))
