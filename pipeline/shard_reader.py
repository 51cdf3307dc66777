"""Reading webdataset shards as img2dataset writes them: samples are runs of tar members sharing a key."""

from __future__ import annotations

import tarfile
from typing import Iterator

from .storage import filesystem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def iter_samples(tar_url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar shard, streamed (the tar is never held whole)."""
    fs, path = filesystem(tar_url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, fields = None, {}
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            if "." not in name:
                continue
            member_key, ext = name.split(".", 1)
            # a new key, or the same key again (a duplicate sample: kept apart, for the stage to count)
            if member_key != key or ext.lower() in fields:
                if key is not None:
                    yield key, fields
                key, fields = member_key, {}
            fields[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield key, fields


def image_of(fields: dict[str, bytes]) -> bytes | None:
    """The encoded image of a sample, whatever its extension."""
    for ext in IMAGE_EXTENSIONS:
        if ext in fields:
            return fields[ext]
    return None
