"""Reading webdataset shards as img2dataset writes them: samples are runs of tar members sharing a key.

The tar stream is parsed here rather than by `tarfile`, whose per-member Python (header objects, a checksum
summed through struct) cost more than decoding a small JPEG: the embed stage's decode tasks spent two thirds
of their time in it. What img2dataset and other writers put in tars is understood: ustar prefixes, pax and GNU
long names, directories, links, and gzip, bzip2 or xz compression of the whole stream.

Every byte of a shard is hostile (a shard may come from anyone's img2dataset run): every header field is
checked before it is used, every size is capped before anything is read (`ReadLimits`), and anything malformed
raises `ShardReadError` (a `tarfile.ReadError`) naming the byte at fault, never another exception or a hang.
"""

from __future__ import annotations

import bz2
import io
import gzip
import lzma
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional

from pipeline.run.storage import filesystem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512
USTAR = b"ustar\x0000"  # POSIX magic and version: only then is 345:500 a name prefix (GNU keeps times there)
FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files: the members that hold data
METADATA_TYPES = (b"x", b"g", b"L", b"K")  # pax extended / global headers, GNU long name / long link name
COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\0", lzma.LZMAFile))
# what a damaged compressed stream raises from inside its decompressor (bz2: OSError "Invalid data stream")
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
MiB = 1 << 20
SKIP_CHUNK = MiB  # members nobody reads (directories, links, unknown types) are skipped this much at a time


# The kinds of damage a ShardReadError reports: a fixed vocabulary, so a stage counts failed shards by kind
# (a hostile tar's bytes and offsets stay in the error's reason, never in a count's key).
BAD_CHECKSUM, CUT_SHORT, PAX_RECORD = "bad checksum", "cut short", "malformed pax record"
OVER_LIMIT, BAD_FIELD, DAMAGED_STREAM = "over a read limit", "invalid header field", "damaged compressed stream"
NOT_REGULAR = "not a regular file"
KINDS = (BAD_CHECKSUM, CUT_SHORT, PAX_RECORD, OVER_LIMIT, BAD_FIELD, DAMAGED_STREAM, NOT_REGULAR)


class ShardReadError(tarfile.ReadError):
    """A shard that is not a tar this reader accepts: damaged, cut short, or over a `ReadLimits` cap. A
    tarfile.ReadError, so callers catching that keep working; str() names the shard when it is known; `kind` is
    one of KINDS."""

    def __init__(self, reason: str, url: Optional[str] = None, kind: str = BAD_FIELD):
        super().__init__(f"{url}: {reason}" if url else reason)
        assert kind in KINDS, kind
        self.reason, self.url, self.kind = reason, url, kind


@dataclass(frozen=True)
class ReadLimits:
    """Caps on what one shard may make the reader hold or do; a shard over one fails with the cap named.

    img2dataset's members are images of at most a few MiB and captions and json of a few KiB, so 64 MiB a
    member (128 MiB a sample) leaves room for any real image while one task holds at most a few of them;
    pax records and GNU long names are file names (4 KiB on Linux), so 64 KiB. Members are capped, so what
    a compression bomb costs is CPU time: a compressed shard may inflate to `decompressed_ratio` times its
    compressed size (at least `decompressed_floor`, at most `decompressed_bytes`). Measured here: tars of
    32 px JPEGs and captions compress 9:1, tars of captions and json alone 82:1 (gzip) and 238:1 (bzip2),
    as their 512-byte headers and padding are mostly zeros; bombs reach 1,028:1 (gzip), 6,800:1 (xz) and
    1,000,000:1 (bzip2). 256:1 stops a gzip bomb at a quarter of its payload, the others far sooner; 4 GiB
    is more than a 10,000-sample shard of 1024 px images (about 2 GiB), a few seconds of gzip's time."""

    member_bytes: int = 64 * MiB
    sample_bytes: int = 128 * MiB  # all the members of one key together
    sample_members: int = 256  # members of one key (img2dataset writes 3: jpg, txt, json)
    metadata_bytes: int = 64 * 1024  # one pax header or GNU long name
    decompressed_ratio: int = 256
    decompressed_floor: int = 32 * MiB  # a shard of a few KiB may still inflate this much
    decompressed_bytes: int = 4 * 1024 * MiB  # also the cap when the compressed size is unknown


LIMITS = ReadLimits()


def _number(field: bytes, what: str, offset: int) -> int:
    """A header's numeric field: octal text, or GNU's base-256 for values that do not fit (never negative)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    # int(text, 8) alone would take "-1", "+7", "0o7" and "1_0": a size of -1 read the rest of the stream
    if text.strip(b"01234567"):
        raise ShardReadError(f"invalid {what} field {field!r} in the header at byte {offset}",
                             kind=BAD_FIELD)
    return int(text, 8) if text else 0


def _read_exactly(stream: BinaryIO, size: int, offset: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ShardReadError(f"unexpected end of data in the member at byte {offset} ({len(data)} of {size} bytes)",
                             kind=CUT_SHORT)
    return data


def _skip(stream: BinaryIO, size: int, offset: int) -> None:
    """Read past `size` bytes of the member at `offset` without holding them."""
    while size > 0:
        size -= len(_read_exactly(stream, min(size, SKIP_CHUNK), offset))


def _pax_records(records: bytes, offset: int) -> dict[bytes, bytes]:
    """{key: value} of a pax extended header, records "<length> <key>=<value>\\n", each checked: a length that
    does not move past its own digits (the issue's `0 path=x`) or runs past the header is an error."""
    position, found = 0, {}
    while position < len(records):
        if records[position] == 0 and not records[position:].strip(b"\0"):  # NUL padding after the last record
            break
        length_text, space, _ = records[position:position + 20].partition(b" ")
        length = int(length_text) if space and length_text.isdigit() else -1
        record = records[position:position + length]
        key, equals, value = record[len(length_text) + 1:].partition(b"=")
        if length < len(length_text) + 4 or len(record) != length or not equals or not key or record[-1:] != b"\n":
            raise ShardReadError(f"malformed pax record at byte {position} of the pax header at byte {offset}: "
                                 f"{records[position:position + 40]!r}", kind=PAX_RECORD)
        found[key] = value[:-1]
        position += length
    return found


def _check_size(size: int, cap: int, field: str, what: str) -> int:
    if size > cap:
        raise ShardReadError(f"{what} declares {size} bytes, over the {cap}-byte limit (ReadLimits.{field})",
                             kind=OVER_LIMIT)
    return size


def _checksum_matches(header: bytes) -> bool:
    try:
        stored = _number(header[148:156], "checksum", 0)
    except ShardReadError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
    return stored == unsigned or stored == unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:])


def iter_members(stream: BinaryIO, limits: ReadLimits = LIMITS) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each file member of an uncompressed tar stream, in order; raises ShardReadError on a
    damaged header, a size over `limits` or a stream that ends inside a member."""
    for name, _, data in iter_member_spans(stream, limits):
        yield name, data


def iter_member_spans(stream: BinaryIO, limits: ReadLimits = LIMITS) -> Iterator[tuple[str, int, bytes]]:
    """(name, offset of its data in the stream, data) of each file member, as `iter_members`."""
    long_name: str | None = None  # from a pax or GNU header, for the member that follows it
    pax_size: int | None = None  # a pax header's `size`, which replaces the next member's own
    offset = 0  # of the header being read, for errors
    while True:
        header = stream.read(BLOCK)
        if not header or header == bytes(BLOCK):  # end of the stream, or the end-of-archive blocks
            return
        if len(header) < BLOCK:
            raise ShardReadError(f"unexpected end of data in the header at byte {offset}", kind=CUT_SHORT)
        if not _checksum_matches(header):
            raise ShardReadError(f"invalid header at byte {offset} (not a tar member: bad checksum)",
                                 kind=BAD_CHECKSUM)
        if header[124:125] == b"\xff":  # GNU base-256 with the sign bit: a negative size
            raise ShardReadError(f"negative size in the header at byte {offset}", kind=BAD_FIELD)
        kind, start = header[156:157], offset
        size = _number(header[124:136], "size", offset) if pax_size is None else pax_size
        pax_size = None
        if kind in METADATA_TYPES:
            if size > limits.metadata_bytes:
                _check_size(size, limits.metadata_bytes, "metadata_bytes", f"the {kind.decode()} header at byte {offset}")
        elif size > limits.member_bytes:
            _check_size(size, limits.member_bytes, "member_bytes", f"the member at byte {offset}")
        padding = -size % BLOCK
        if kind in FILE_TYPES or kind in METADATA_TYPES:
            data = _read_exactly(stream, size, offset)
            if padding:
                _read_exactly(stream, padding, offset)
        else:  # directories, links, devices: no sample data, never held
            _skip(stream, size + padding, offset)
        offset += BLOCK + size + padding
        if kind == b"x":
            records = _pax_records(data, start)
            if b"path" in records:
                long_name = records[b"path"].decode("utf-8", errors="replace")
            if b"size" in records:
                text = records[b"size"]
                if not text.isdigit() or len(text) > 20:  # int() of a 5,000-digit text raises ValueError
                    raise ShardReadError(f"invalid pax size {text[:20]!r} in the pax header before byte {offset}",
                                         kind=PAX_RECORD)
                pax_size = _check_size(int(text), limits.member_bytes, "member_bytes", f"the member at byte {offset}")
        elif kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        elif kind in (b"g", b"K"):  # a pax global header, a GNU long link name: nothing in them names a member
            continue
        elif kind in FILE_TYPES:
            name = long_name
            if name is None:
                name, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
                name = (prefix + b"/" + name if prefix and header[257:265] == USTAR else name).decode(
                    "utf-8", errors="replace")
            long_name = None
            yield name, start + BLOCK, data
        else:
            long_name = None


class _Capped:
    """A decompressing stream that raises ShardReadError once it has inflated more than `cap` bytes, or when
    its decompressor finds the data damaged (instead of EOFError, zlib.error, OSError...)."""

    def __init__(self, stream: BinaryIO, cap: int, kind: str):
        self.stream, self.cap, self.kind, self.total = stream, cap, kind, 0

    def read(self, size: int) -> bytes:
        try:
            data = self.stream.read(size)
        except DECOMPRESSION_ERRORS as error:
            raise ShardReadError(f"damaged {self.kind} stream after {self.total} bytes: "
                                 f"{type(error).__name__}: {error}", kind=DAMAGED_STREAM) from None
        self.total += len(data)
        if self.total > self.cap:
            raise ShardReadError(f"the {self.kind} stream inflates past {self.cap} bytes (ReadLimits: decompressed_*): "
                                 "a compression bomb?", kind=OVER_LIMIT)
        return data


def _uncompressed(stream: BinaryIO, size_of: Callable[[], Optional[int]], limits: ReadLimits = LIMITS) -> BinaryIO:
    """The stream itself, or a capped decompressing view of it when it starts with a compressor's magic bytes
    (`size_of`: the compressed size, asked only then)."""
    magic = stream.read(6)
    stream.seek(0)
    for (prefix, opener), kind in zip(COMPRESSED, ("gzip", "bzip2", "xz")):
        if magic.startswith(prefix):
            cap, compressed_size = limits.decompressed_bytes, size_of()
            if compressed_size is not None:
                cap = min(cap, max(limits.decompressed_floor, limits.decompressed_ratio * compressed_size))
            return _Capped(opener(stream), cap, kind)
    return stream


def _size_of(f, fs, path: str) -> Optional[int]:
    """The size of an open file: fsspec's buffered files know it; a local file is asked; None if unknown."""
    size = getattr(f, "size", None)
    if isinstance(size, int):
        return size
    try:
        return int(fs.size(path))
    except Exception:  # noqa: BLE001 - unknown: the absolute cap applies
        return None


def _grouped(members: Iterator[tuple[str, bytes]], limits: ReadLimits) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, fields, held = None, {}, 0
    for name, data in members:
        name = name.rsplit("/", 1)[-1]
        if "." not in name:
            continue
        member_key, ext = name.split(".", 1)
        ext = ext.lower()
        # a new key, or the same key again (a duplicate sample: kept apart, for the stage to count)
        if member_key != key or ext in fields:
            if key is not None:
                yield key, fields
            key, fields, held = member_key, {}, 0
        held += len(data)
        if held > limits.sample_bytes or len(fields) >= limits.sample_members:
            raise ShardReadError(f"sample {member_key[:100]!r} holds over {limits.sample_bytes} bytes or "
                                 f"{limits.sample_members} members (ReadLimits.sample_bytes / sample_members)",
                                 kind=OVER_LIMIT)
        fields[ext] = data
    if key is not None:
        yield key, fields


def iter_samples(tar_url: str, limits: ReadLimits = LIMITS) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar shard, streamed (the tar is never held whole); raises
    ShardReadError naming the shard when it is damaged or over `limits`."""
    fs, path = filesystem(tar_url)
    try:
        with fs.open(path, "rb") as f:
            stream = _uncompressed(f, lambda: _size_of(f, fs, path), limits)
            yield from _grouped(iter_members(stream, limits), limits)
    except ShardReadError as error:
        if error.url:
            raise
        raise ShardReadError(error.reason, tar_url, error.kind) from None
    except io.UnsupportedOperation:  # a FIFO, a socket, a character device: opening or rewinding it cannot seek
        raise ShardReadError("cannot seek: not a regular file", tar_url, NOT_REGULAR) from None


def image_spans(tar_url: str, limits: ReadLimits = LIMITS) -> Optional[dict[str, tuple[int, int]]]:
    """{key: (offset, size)} of each sample's image member in an uncompressed shard, read once so that one image is
    then a ranged read (`read_span`); None for a compressed shard, whose offsets no reader can seek to."""
    fs, path = filesystem(tar_url)
    spans: dict[str, tuple[int, int]] = {}
    try:
        with fs.open(path, "rb") as f:
            stream = _uncompressed(f, lambda: _size_of(f, fs, path), limits)
            if stream is not f:
                return None
            for name, offset, data in iter_member_spans(stream, limits):
                key, _, ext = name.rsplit("/", 1)[-1].partition(".")
                if ext.lower() in IMAGE_EXTENSIONS:
                    spans.setdefault(key, (offset, len(data)))
    except ShardReadError as error:
        raise ShardReadError(error.reason, error.url or tar_url, error.kind) from None
    return spans


def read_span(tar_url: str, offset: int, size: int) -> bytes:
    """`size` bytes of a shard from `offset` (a member `image_spans` found)."""
    fs, path = filesystem(tar_url)
    with fs.open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def image_of(fields: dict[str, bytes]) -> bytes | None:
    """The encoded image of a sample, whatever its extension."""
    for ext in IMAGE_EXTENSIONS:
        if ext in fields:
            return fields[ext]
    return None
