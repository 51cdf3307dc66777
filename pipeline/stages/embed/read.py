"""The embed stage's decode tasks: each reads a shard's tar and decodes its images to CLIP's input size.

    {shard, tar} --decode_shards (Ray Data task over shards)--> blocks of rows (rows.py's sample stream): the
    shard's samples with uint8 pixels, then its END row (the samples read), or a FAILED row (an unreadable tar,
    or one not read and decoded within embed.shard_timeout)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterator, Optional

import numpy as np

from pipeline.formats.shard_reader import ShardReadError, image_of, iter_samples
from pipeline.stages.embed.rows import (CAPTION, COUNT, ERROR, KEY, KIND, PIXELS, SAMPLE, SHARD, TAR, IMAGE, end_row,
                                        failed_row, sample_row)

log = logging.getLogger(__name__)

READ_AHEAD = 32  # rows a decode task's reader thread reads ahead of its decoding (their image bytes are held)


def read_shard(item: dict) -> Iterator[dict]:
    """The sample rows of one tar, then its END row; a FAILED row instead of the END if the tar is unreadable."""
    shard, tar = item[SHARD], item[TAR]
    read = 0
    try:
        for key, fields in iter_samples(tar):
            image = image_of(fields)
            caption = fields.get("txt", b"").decode("utf-8", errors="replace")
            read += 1
            yield sample_row(shard, key, image or b"", caption, "" if image else "no image in sample")
    except Exception as error:  # noqa: BLE001 - reported as the shard's failure, the others go on
        # The first line, the kind of damage from the reader's fixed vocabulary (or the exception's type), keys the
        # stage's count of failed rows; the detail (the tar's bytes and offsets) follows, kept in the ledger's
        # failed-shard error and the log only.
        kind, reason = (error.kind, error.reason) if isinstance(error, ShardReadError) else (type(error).__name__, error)
        log.warning("embed: shard %s unreadable (%s): %s: %s", shard, kind, tar, reason)
        yield failed_row(shard, f"unreadable shard: {kind}\n{tar}: {reason}")
        return
    yield end_row(shard, read)


def decode_rows(rows: list[dict], image_size: int) -> dict[str, np.ndarray]:
    """A block of read rows with their images decoded to CLIP's input size as uint8 (no torch here, so a decode
    task starts fast); an undecodable image gets an error and zero pixels, as do END and FAILED rows."""
    from pipeline.formats.decode import decode_resized

    errors = [row[ERROR] for row in rows]
    pixels = np.zeros((len(rows), image_size, image_size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        if errors[i] or row[KIND] != SAMPLE:
            continue
        try:
            pixels[i] = decode_resized(row[IMAGE], image_size)
        except Exception as error:  # noqa: BLE001 - a corrupt image is skipped and counted
            errors[i] = f"corrupt image: {type(error).__name__}"
    block = {column: np.asarray([row[column] for row in rows], dtype=object) for column in (SHARD, KEY, CAPTION, KIND)}
    return {**block, COUNT: np.asarray([row[COUNT] for row in rows], dtype=np.int64),
            ERROR: np.asarray(errors, dtype=object), PIXELS: pixels}


class _Budget:
    """Seconds left to read and decode a shard, spent only while the task works on it: the time it waits for
    CLIP to take its blocks (Ray Data's backpressure holds a generator at its yield) is not the shard's fault."""

    def __init__(self, seconds: Optional[float]):
        self.left, self.since = seconds, time.monotonic()

    def remaining(self) -> Optional[float]:
        return None if self.left is None else max(0.0, self.left - (time.monotonic() - self.since))

    def pause(self) -> None:
        self.left = self.remaining()

    def resume(self) -> None:
        self.since = time.monotonic()


def _read_ahead(rows: Iterator[dict], budget: _Budget) -> Iterator[Optional[dict]]:
    """`rows` read by a thread of their own, so that a read blocked for ever (a stalled object store, a FIFO that
    never delivers) cannot hold the task past its budget; yields None when the budget runs out first. The
    thread is then told to stop; one blocked inside a read stays blocked (threads cannot be killed), a daemon
    holding one open file, and the task goes on to its next shard."""
    ahead: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    stop, done = threading.Event(), object()

    def pump() -> None:
        try:
            for row in rows:
                ahead.put(row)
                if stop.is_set():
                    return
        finally:
            if not stop.is_set():
                ahead.put(done)

    threading.Thread(target=pump, daemon=True, name="embed-read-shard").start()
    try:
        while True:
            try:
                row = ahead.get(timeout=budget.remaining())
            except queue.Empty:
                yield None
                return
            if row is done:
                return
            yield row
    finally:  # unblock a pump waiting on a full queue, so that it sees `stop` and closes the tar
        stop.set()
        while not ahead.empty():
            ahead.get_nowait()


def decode_shards(batch: dict[str, np.ndarray], image_size: int, block_rows: int,
                  shard_timeout: Optional[float] = None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task over shards: each one read and decoded in the same task (the tar's bytes never cross the
    object store), sent on `block_rows` rows at a time; its END (or FAILED) row comes last. A shard not read
    and decoded within `shard_timeout` seconds fails with a FAILED row naming the deadline."""
    for shard, tar in zip(batch[SHARD].tolist(), batch[TAR].tolist()):
        rows: list[dict] = []
        budget = _Budget(shard_timeout)
        for row in _read_ahead(read_shard({SHARD: shard, TAR: tar}), budget):
            if row is not None:
                rows.append(row)
                if len(rows) < block_rows and row[KIND] == SAMPLE:
                    continue
                block, rows = decode_rows(rows, image_size), []
            if row is None or budget.remaining() == 0:  # the read, or the decode, ran the budget out
                log.error("embed: shard %s not read and decoded within embed.shard_timeout", shard)
                yield decode_rows([failed_row(shard, f"{tar} not read and decoded within embed.shard_timeout "
                                                     f"({shard_timeout:g} s)")], image_size)
                break
            budget.pause()
            yield block
            budget.resume()
