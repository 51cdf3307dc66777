"""The one durable write of the project: a file is whole or absent, after a crash or a power loss.

Checkpoints (dalle2.checkpoint) and every stage output (pipeline.run.storage) write through it."""

from __future__ import annotations

import os
import uuid

import fsspec
import fsspec.implementations.local


def write_atomic(url: str, data: bytes) -> None:
    """Write `data` so readers see either nothing or the whole file.

    Local files are written under a temporary name, fsynced, renamed, and their folder fsynced: after a power
    loss the file is whole or absent (without the fsyncs the rename can reach the disk before the data, and a
    ledger record written next would mark torn outputs as done). Object stores (s3, gs, memory) make a single
    PUT visible at once, so they are written directly.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    created = []  # local folders this write creates, innermost first
    if parent and isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        folder = parent
        while folder and not os.path.isdir(folder):
            created.append(folder)
            folder = os.path.dirname(folder)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    from dalle2.faults import crash_point

    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        for folder in created:  # a new folder's own name must last too, or the file vanishes with it
            fsync_folder(os.path.dirname(folder) or ".")
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            crash_point("storage.mid_write")  # a torn temporary file, never a torn `path`
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(os.path.dirname(path) or ".")
    else:
        crash_point("storage.mid_write")
        with fs.open(path, "wb") as f:
            f.write(data)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str) -> None:
    """Make the names in a local folder durable (a rename or a new file reaches the disk with it)."""
    fsync_path(folder)
