"""Reading webdataset shards as img2dataset writes them: samples are runs of tar members sharing a key.

The tar stream is parsed here rather than by `tarfile`, whose per-member Python (header objects, a checksum
summed through struct) cost more than decoding a small JPEG: the embed stage's decode tasks spent two thirds
of their time in it. Headers are still checked (checksum, sizes, a stream cut short), and what img2dataset
and other writers put in tars is understood: ustar prefixes, pax and GNU long names, directories, links,
and gzip, bzip2 or xz compression of the whole stream.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from typing import BinaryIO, Iterator

from .storage import filesystem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512
USTAR = b"ustar\x0000"  # POSIX magic and version: only then is 345:500 a name prefix (GNU keeps times there)
FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files: the members that hold data
COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\0", lzma.LZMAFile))


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or GNU's base-256 for values that do not fit."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _read_exactly(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise tarfile.ReadError(f"unexpected end of data in {what} ({len(data)} of {size} bytes)")
    return data


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header ("<length> <key>=<value>\\n" records), if it sets one."""
    position, path = 0, None
    while position < len(records):
        length_text, _, _ = records[position:position + 20].partition(b" ")
        if not length_text.isdigit():
            break
        record = records[position:position + int(length_text)]
        key, _, value = record[len(length_text) + 1:].partition(b"=")
        if key == b"path":
            path = value[:-1].decode("utf-8", errors="replace")  # the record ends with a newline
        position += int(length_text)
    return path


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each file member of an uncompressed tar stream, in order; raises tarfile.ReadError on a
    damaged header or a stream that ends inside a member."""
    long_name: str | None = None  # from a pax or GNU header, for the member that follows it
    offset = 0  # of the header being read, for errors
    while True:
        header = stream.read(BLOCK)
        if not header or header == bytes(BLOCK):  # end of the stream, or the end-of-archive blocks
            return
        if len(header) < BLOCK:
            raise tarfile.ReadError(f"unexpected end of data in the header at byte {offset}")
        try:
            stored, size = _number(header[148:156]), _number(header[124:136])
        except ValueError:
            stored = size = -1
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:]):
            raise tarfile.ReadError(f"invalid header at byte {offset} (not a tar member: bad checksum)")
        kind = header[156:157]
        data = _read_exactly(stream, size, f"the member at byte {offset}")
        padding = -size % BLOCK
        if padding:
            _read_exactly(stream, padding, f"the member at byte {offset}")
        offset += BLOCK + size + padding
        if kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        elif kind == b"g":  # pax global header: nothing in it names a member
            continue
        elif kind in FILE_TYPES:
            name = long_name
            if name is None:
                name, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
                name = (prefix + b"/" + name if prefix and header[257:265] == USTAR else name).decode(
                    "utf-8", errors="replace")
            long_name = None
            yield name, data
        else:  # directories, links, devices: no sample data
            long_name = None


def _uncompressed(stream: BinaryIO) -> BinaryIO:
    """The stream itself, or a decompressing view of it when it starts with a compressor's magic bytes."""
    magic = stream.read(6)
    stream.seek(0)
    for prefix, opener in COMPRESSED:
        if magic.startswith(prefix):
            return opener(stream)
    return stream


def iter_samples(tar_url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar shard, streamed (the tar is never held whole)."""
    fs, path = filesystem(tar_url)
    with fs.open(path, "rb") as f:
        key, fields = None, {}
        for name, data in iter_members(_uncompressed(f)):
            name = name.rsplit("/", 1)[-1]
            if "." not in name:
                continue
            member_key, ext = name.split(".", 1)
            ext = ext.lower()
            # a new key, or the same key again (a duplicate sample: kept apart, for the stage to count)
            if member_key != key or ext in fields:
                if key is not None:
                    yield key, fields
                key, fields = member_key, {}
            fields[ext] = data
        if key is not None:
            yield key, fields


def image_of(fields: dict[str, bytes]) -> bytes | None:
    """The encoded image of a sample, whatever its extension."""
    for ext in IMAGE_EXTENSIONS:
        if ext in fields:
            return fields[ext]
    return None
