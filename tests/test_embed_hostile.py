"""The embed stage over hostile shards, on a real local Ray: a tar that breaks the reader part way and a tar
that never delivers a byte (a FIFO with no writer: its open blocks for ever) each fail alone with their reason
and every row counted, while the other shards are embedded and the stage ends."""

import os
import tarfile

import pytest

from jobs.status import run_status
from pipeline.config import EmbedConfig
from pipeline.embed import run_embed
from pipeline.layout import RunLayout
from pipeline.ledger import Ledger
from pipeline.shapes import write_shards
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
    write_shards(root, 40, per_shard=10, size=32)  # shards 00000-00003, 10 samples each
    layout = RunLayout(root)
    with tarfile.open(layout.shard_tar("00001")) as tar:
        cut = tar.getmembers()[8].offset  # after 4 samples (a jpg and a txt each)
    good = open(layout.shard_tar("00001"), "rb").read()
    # 4 good samples, then the pax record `0 path=x`, which looped for ever
    with open(layout.shard_tar("00001"), "wb") as f:
        f.write(good[:cut] + pax(b"0 path=x\n") + end())
    fifo = layout.shard_tar("00002")
    os.remove(fifo)
    os.mkfifo(fifo)
    try:
        summary = run_embed(EmbedConfig(batch_size=16, decode_block_rows=4, shard_timeout=3.0), root)
    finally:
        unblock(fifo)

    hostile = f"shard failed: unreadable shard <path>: malformed pax record at byte 0 of the pax header at byte {cut}: b'0 path=x\\n'"
    stalled = "shard failed: <path> not read and decoded within embed.shard_timeout (3 s)"
    assert sorted(summary["failed_shards"]) == ["00001", "00002"]
    assert "embed.shard_timeout" in summary["failed_shards"]["00002"]["error"]
    assert summary["failed_by_reason"] == {hostile: 10, stalled: 10}
    assert summary["rows_in"] == 40 and summary["written"] == 20 and summary["failed"] == 20
    # the ledger, as `dalle2 status` reads it: the two shards done, the two failed with all their rows
    ledger = Ledger(layout, "embed")
    assert ledger.done() == {"00000", "00003"}
    assert {s: f["rows"] for s, f in ledger.failures().items()} == {"00001": 10, "00002": 10}
    status = run_status(root)["embed"]
    assert status["rows_in"] == status["written"] + status["failed"] == 40
