"""The embed stage over hostile shards, on a real local Ray: a tar that breaks the reader part way and a tar
that never delivers a byte (a FIFO with no writer: its open blocks for ever) each fail alone with their reason
and every row counted, while the other shards are embedded and the stage ends."""

import os
import tarfile

import pytest

from jobs.status import run_status
from pipeline.execution.session import RaySession
from pipeline.run.config import EmbedConfig
from pipeline.stages.embed.stage import run_embed
from pipeline.run.layout import RunLayout
from pipeline.run.ledger import Ledger
from jobs.shapes import write_shards
from tests.malformed_tars import end, pax


def unblock(fifo: str) -> None:
    """Open the FIFO for writing and close it: a reader blocked in its open gets EOF, and its thread ends."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader left on it
        pass


@pytest.mark.timeout(300)  # a deadline that does not work hangs the stage: fail instead
def test_hostile_and_stalled_shards_fail_alone_with_every_row_counted(tmp_path, ray_local):
    root = str(tmp_path / "run")
    write_shards(root, 50, per_shard=10, size=32)  # shards 00000-00004, 10 samples each
    layout = RunLayout(root)
    cuts = {}
    # 00001: 4 good samples, then the pax record `0 path=x`, which looped for ever; 00004: 2, then another
    # malformed record: both of one kind, so one key in the counts whatever their bytes and offsets
    for shard, members, record in (("00001", 8, b"0 path=x\n"), ("00004", 4, b"1x path=y\n")):
        with tarfile.open(layout.shard_tar(shard)) as tar:
            cuts[shard] = tar.getmembers()[members].offset  # a jpg and a txt per sample
        good = open(layout.shard_tar(shard), "rb").read()
        with open(layout.shard_tar(shard), "wb") as f:
            f.write(good[:cuts[shard]] + pax(record) + end())
    fifo = layout.shard_tar("00002")
    os.remove(fifo)
    os.mkfifo(fifo)
    try:
        summary = run_embed(EmbedConfig(batch_size=16, decode_block_rows=4, shard_timeout=3.0), root, RaySession())
    finally:
        unblock(fifo)

    hostile = "shard failed: unreadable shard: malformed pax record"  # the reader's kind, never the tar's bytes
    stalled = "shard failed: <path> not read and decoded within embed.shard_timeout (3 s)"
    assert sorted(summary["failed_shards"]) == ["00001", "00002", "00004"]
    assert "embed.shard_timeout" in summary["failed_shards"]["00002"]["error"]
    assert summary["failed_by_reason"] == {hostile: 20, stalled: 10}
    assert summary["rows_in"] == 50 and summary["written"] == 20 and summary["failed"] == 30
    # the detail, with the tar named once, stays in the failed shard's error
    assert summary["failed_shards"]["00001"]["error"] == (
        f"unreadable shard: malformed pax record\n{layout.shard_tar('00001')}: malformed pax record at byte 0 of "
        f"the pax header at byte {cuts['00001']}: b'0 path=x\\n'")
    # the ledger, as `dalle2 status` reads it: the two shards done, the two failed with all their rows
    ledger = Ledger(layout, "embed")
    assert ledger.done() == {"00000", "00003"}
    assert {s: f["rows"] for s, f in ledger.failures().items()} == {"00001": 10, "00002": 10, "00004": 10}
    status = run_status(root)["embed"]
    assert status["rows_in"] == status["written"] + status["failed"] == 50
