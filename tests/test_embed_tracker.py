"""The embed stage's row schema and its driver's bookkeeping, without Ray: every row says its kind (a sample, a
shard's end with the samples read, or its failure), and the tracker releases a shard to be finished exactly when
its end row and all of those samples are in parts, whichever came last, never before and never twice."""

import math
import tarfile

import numpy as np
import pytest

from jobs.shapes import write_shards
from pipeline.formats.queries import ShardInfo
from pipeline.run.layout import RunLayout
from pipeline.run.storage import read_parquet
from pipeline.stages.embed.read import decode_shards
from pipeline.stages.embed.rows import (COUNT, EMBEDDED_AT, END, ERROR, FAILED, IMG_EMB, KIND, LOADED_AT, SAMPLE,
                                        TEXT_EMB, PartRow, end_row, failed_row, part_batch, part_rows, sample_row)
from pipeline.stages.embed.timing import Clock
from pipeline.stages.embed.tracker import ShardTracker
from pipeline.stages.embed.writer import write_parts


def infos(**expected) -> dict[str, ShardInfo]:
    return {shard: ShardInfo(shard, f"/run/shards/{shard}.tar", n, n, 1) for shard, n in expected.items()}


def part(shard: str, name: str, rows: int) -> PartRow:
    return PartRow(shard, SAMPLE, part=f"/scratch/{shard}/{name}", rows=rows)


def test_rows_say_their_kind_and_count_and_keep_error_for_real_errors():
    assert (end_row("00001", 7)[KIND], end_row("00001", 7)[COUNT], end_row("00001", 7)[ERROR]) == (END, 7, "")
    assert failed_row("00001", "unreadable shard: cut short")[KIND] == FAILED
    assert failed_row("00001", "unreadable shard: cut short")[ERROR] == "unreadable shard: cut short"
    assert sample_row("00001", "000010", b"x", "c")[KIND] == SAMPLE and sample_row("00001", "000010", b"x", "c")[COUNT] == 0
    rows = [part("00000", "a", 3), PartRow("00000", END, count=3), PartRow("00001", FAILED, error="bad\ndetail")]
    assert list(part_rows(part_batch(rows))) == rows  # what a write task returns is what the driver reads
    with pytest.raises(ValueError, match="kind 'shard end'"):
        PartRow("00000", "shard end")


def test_a_shard_is_released_when_its_end_row_comes_after_its_last_part():
    tracker = ShardTracker(infos(**{"00000": 5}))
    assert tracker.add(part("00000", "a", 3)) and tracker.add(part("00000", "b", 2))
    assert tracker.take_ready() == []  # all samples in, but not yet known to be all
    assert tracker.add(PartRow("00000", END, count=5))
    assert tracker.take_ready() == [("00000", ["/scratch/00000/a", "/scratch/00000/b"])]
    assert tracker.take_ready() == []  # handed out once


def test_a_late_sample_after_the_end_row_is_waited_for_and_never_dropped():
    tracker = ShardTracker(infos(**{"00000": 5, "00001": 2}))
    tracker.add(part("00000", "a", 3))
    tracker.add(PartRow("00000", END, count=5))
    assert tracker.take_ready() == []  # 3 of 5 samples in parts: not finished yet
    tracker.add(part("00001", "x", 2))
    tracker.add(PartRow("00001", END, count=2))
    assert tracker.take_ready() == [("00001", ["/scratch/00001/x"])]  # another shard ends meanwhile
    assert tracker.add(part("00000", "b", 2))  # the late part
    assert tracker.take_ready() == [("00000", ["/scratch/00000/a", "/scratch/00000/b"])]
    # a replay of a released shard's part counts nothing and releases nothing again
    assert not tracker.add(part("00000", "b", 2)) and tracker.take_ready() == []
    tracker.finish("00000")
    tracker.finish("00001")
    assert tracker.close() == {} and tracker.ended() == 2


def test_a_failed_shard_is_never_released_and_keeps_its_reason():
    tracker = ShardTracker(infos(**{"00000": 4, "00001": 1}))
    tracker.add(part("00000", "a", 2))
    tracker.add(PartRow("00000", FAILED, error="unreadable shard: cut short\n/run/shards/00000.tar: at byte 9"))
    tracker.add(part("00000", "b", 2))  # rows read before the failure, still coming through CLIP
    tracker.add(PartRow("00001", END, count=1))
    tracker.add(part("00001", "c", 1))
    assert tracker.take_ready() == [("00001", ["/scratch/00001/c"])]
    tracker.finish("00001", "OSError: disk full")  # its finish task failed
    assert tracker.close() == {"00000": "unreadable shard: cut short\n/run/shards/00000.tar: at byte 9",
                               "00001": "OSError: disk full"}
    assert tracker.ended() == 2


def test_counts_reconcile_with_the_parquet_and_missing_samples_fail_the_shard():
    tracker = ShardTracker({**infos(**{"00000": 2, "00001": 3}), "00002": ShardInfo("00002", "/t/00002.tar", None, None, None)})
    tracker.add(PartRow("00000", END, count=3))  # the tar holds more than its parquet lists
    tracker.add(part("00000", "a", 3))
    tracker.add(part("00001", "b", 2))
    tracker.add(PartRow("00001", END, count=3))  # one sample never came back
    tracker.add(PartRow("00002", END, count=0))  # an empty shard made elsewhere: ready at once, no parts
    assert tracker.take_ready() == [("00002", [])]
    tracker.finish("00002")
    failures = tracker.close()
    assert failures == {"00000": "tar /run/shards/00000.tar holds 3 samples, its parquet lists 2",
                        "00001": "only 2 of 3 samples of /run/shards/00001.tar came back"}
    assert tracker.samples_read("00001") == 3 and tracker.ended() == 3
    assert tracker.finished | set(failures) == set(tracker.infos)


def test_closing_with_a_shard_still_to_finish_is_refused():
    tracker = ShardTracker(infos(**{"00000": 1}))
    tracker.add(part("00000", "a", 1))
    tracker.add(PartRow("00000", END, count=1))
    with pytest.raises(RuntimeError, match="still to finish"):
        tracker.close()


def test_decode_tasks_end_each_shard_with_a_kind_not_an_error_string(tmp_path):
    root = str(tmp_path / "run")
    write_shards(root, 14, per_shard=7, size=32)
    layout = RunLayout(root)
    with tarfile.open(layout.shard_tar("00001")) as tar:
        cut = tar.getmembers()[6].offset
    with open(layout.shard_tar("00001"), "r+b") as f:  # some samples, then a member cut short
        f.truncate(cut + 700)
    batch = {"shard": np.asarray(["00000", "00001"], object),
             "tar": np.asarray([layout.shard_tar("00000"), layout.shard_tar("00001")], object)}
    blocks = list(decode_shards(batch, image_size=16, block_rows=4))
    shard = np.concatenate([b["shard"] for b in blocks])
    kinds, counts, errors = (np.concatenate([b[c] for b in blocks]) for c in (KIND, COUNT, ERROR))
    assert list(kinds[shard == "00000"]) == [SAMPLE] * 7 + [END] and counts[shard == "00000"][-1] == 7
    assert not any(errors[shard == "00000"])
    assert kinds[shard == "00001"][-1] == FAILED and set(kinds[shard == "00001"][:-1]) == {SAMPLE}
    assert errors[shard == "00001"][-1].startswith("unreadable shard: ") and not any(errors[shard == "00001"][:-1])
    assert blocks[0]["pixels"].shape[1:] == (16, 16, 3) and blocks[0]["pixels"][0].any()


def test_write_tasks_pass_on_end_and_failed_rows_and_write_samples_to_parts(tmp_path):
    shards = ["00000", "00000", "00001", "00000", "00001"]
    kinds = [SAMPLE, SAMPLE, SAMPLE, END, FAILED]
    batch = {"shard": np.asarray(shards, object), "key": np.asarray(["000000", "000001", "000010", "", ""], object),
             "caption": np.asarray(["a", "b", "c", "", ""], object), KIND: np.asarray(kinds, object),
             COUNT: np.asarray([0, 0, 0, 2, 0]), ERROR: np.asarray(["", "corrupt image: OSError", "", "", "why"], object),
             IMG_EMB: np.ones((5, 4), np.float32), TEXT_EMB: np.ones((5, 4), np.float32),
             EMBEDDED_AT: np.asarray([10.0, 10.0, 11.0, 11.0, 12.0]), LOADED_AT: np.full(5, 9.0)}
    rows = list(part_rows(write_parts(batch, str(tmp_path), "float16")))
    assert [(r.shard, r.kind, r.count, r.rows, r.error) for r in rows] == [
        ("00000", END, 2, 0, ""), ("00001", FAILED, 0, 0, "why"), ("00000", SAMPLE, 0, 2, ""), ("00001", SAMPLE, 0, 1, "")]
    table = read_parquet(rows[2].part)
    assert table.column("key").to_pylist() == ["000000", "000001"]
    assert table.column(ERROR).to_pylist() == ["", "corrupt image: OSError"]  # a sample's own error, kept
    assert (rows[2].first_at, rows[2].first_rows, rows[2].last_at, rows[2].loaded_at) == (10.0, 2, 10.0, 9.0)


def test_the_clock_gives_the_summarys_timing_keys_from_part_rows():
    clock = Clock()
    clock.mark("planning_s")
    clock.mark("ray_s")
    start = clock.started
    clock.saw(PartRow("00000", SAMPLE, part="p", rows=4, first_at=start + 5, first_rows=4, last_at=start + 5,
                      loaded_at=start + 4), counted=True)
    clock.saw(PartRow("00000", SAMPLE, part="q", rows=6, first_at=start + 6, first_rows=6, last_at=start + 8,
                      loaded_at=start + 3), counted=True)
    clock.saw(PartRow("00000", SAMPLE, part="q", rows=6, first_at=start + 6, first_rows=6, last_at=start + 99,
                      loaded_at=math.inf), counted=False)  # a replay: not timed again
    timing = clock.summary()
    assert set(timing) == {"startup_s", "startup_steps", "steady_rows_per_s"}
    assert list(timing["startup_steps"]) == ["planning_s", "ray_s", "model_load_s", "first_batch_s"]
    assert timing["startup_s"] == 5.0 and timing["steady_rows_per_s"] == 2.0  # 6 rows after the first batch, in 3 s
    assert Clock().summary() == {}
