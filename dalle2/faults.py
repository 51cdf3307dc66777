"""Named crash points for fault-injection tests: the process kills itself with SIGKILL the Nth time it
passes an armed point, exactly as a lost node or an OOM kill would end it (no cleanup, no finally).

    DALLE2_CRASH_AT="embed.after_outputs@2"      arm one point (N = 2); several: comma-separated
    DALLE2_CRASH_STATE=/tmp/faults               where the pass counters live (shared by every process
                                                 of the machine, so Ray workers count together)

Unarmed (the normal case) a crash point costs one dictionary lookup. The points, by stage:
    download.mid_shard        after some images of a shard are in its tar, before the tar is closed
    download.after_outputs    after a shard's tar, parquet and stats, before its ledger record
    embed.between_files       after a shard's clip-retrieval files, before its aligned files
    embed.after_outputs       after a shard's aligned files, before its ledger record
    embed.after_submit        in the driver, after starting the task that writes a shard's outputs
    filter.mid_search         in the run-wide duplicate search, before a pending shard (those before it recorded)
    filter.after_mask         after a shard's final mask, before its ledger record
    reorder.mid_split         after some of a part's scratch files, before its done marker
    reorder.after_split       every part split, before any gather
    reorder.after_outputs     after a shard's aligned files, before its ledger record
    storage.mid_write         half of a file written, before it is complete (every atomic write)
    train.mid_step            after an optimizer step, before it is reported
    train.mid_checkpoint      a checkpoint written to its local folder, before Ray persists it
    train.before_marker       a checkpoint persisted by Ray (and maybe registered), before its COMPLETE marker
    checkpoint.before_marker  every file of a save_checkpoint written, before its COMPLETE marker
"""

from __future__ import annotations

import os
import signal

ENV_POINTS = "DALLE2_CRASH_AT"
ENV_STATE = "DALLE2_CRASH_STATE"

POINTS = (
    "download.mid_shard", "download.after_outputs", "embed.between_files", "embed.after_outputs", "embed.after_submit",
    "filter.mid_search", "filter.after_mask", "reorder.mid_split", "reorder.after_split", "reorder.after_outputs",
    "storage.mid_write",
    "train.mid_step", "train.mid_checkpoint", "train.before_marker", "checkpoint.before_marker",
)


def armed() -> dict[str, int]:
    """{point: N} from the environment; a point not in POINTS is an error (a typo would arm nothing)."""
    spec = os.environ.get(ENV_POINTS, "").strip()
    if not spec:
        return {}
    points = {}
    for item in spec.split(","):
        name, _, nth = item.strip().partition("@")
        if name not in POINTS:
            raise ValueError(f"{ENV_POINTS}: unknown crash point {name!r}; known: {', '.join(POINTS)}")
        points[name] = int(nth or 1)
    return points


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if `name` is armed and this is its Nth pass (counted machine-wide)."""
    if ENV_POINTS not in os.environ:
        return
    nth = armed().get(name)
    if nth is None:
        return
    state = os.environ.get(ENV_STATE) or os.path.join("/tmp", f"dalle2-crash-{os.getuid()}")
    os.makedirs(state, exist_ok=True)
    counter = os.path.join(state, name)
    # one byte appended per pass: O_APPEND writes are atomic, so concurrent workers count correctly
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
        passes = os.lseek(fd, 0, os.SEEK_CUR)  # the offset right after our own byte: this pass's number
    finally:
        os.close(fd)
    if passes == nth:
        os.kill(os.getpid(), signal.SIGKILL)
