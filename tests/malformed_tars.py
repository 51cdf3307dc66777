"""Hand-made hostile tar shards, built in code: one per attack the reader must refuse (issue 20), plus the
header and member builders the fuzzer mutates. Each corpus entry is written to a file, some with a long sparse
tail (zeros cost no disk and read fast), so a reader that pulls the rest of the stream into memory shows it."""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import lzma
import os
import random
import tarfile
import zlib

BLOCK = 512
MiB = 1 << 20
USTAR = b"ustar\x0000"


def checksummed(header: bytearray) -> bytes:
    """The header with a valid checksum (the field counted as spaces), as tar writers store it."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def header(name: bytes = b"000000000.jpg", size: int = 0, kind: bytes = b"0", size_field: bytes | None = None,
           ustar: bool = True) -> bytes:
    """A ustar header block; `size_field` (12 bytes) replaces the octal size, for sizes no writer would store."""
    block = bytearray(BLOCK)
    block[: len(name[:100])] = name[:100]
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    if ustar:
        block[257:265] = USTAR
    return checksummed(block)


def member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    """Header, data and padding of one member."""
    return header(name, len(data), kind) + data + bytes(-len(data) % BLOCK)


def pax(records: bytes) -> bytes:
    """A pax extended header member holding `records` as they are (well-formed or not)."""
    return member(b"././@PaxHeader", records, b"x")


def pax_record(key: bytes, value: bytes) -> bytes:
    """One well-formed "<length> <key>=<value>\\n" record (the length counts its own digits)."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def good_samples(count: int = 3) -> bytes:
    """`count` samples of a jpg and a txt each, as img2dataset writes them (no end blocks)."""
    return b"".join(member(b"%09d.jpg" % i, b"\xff\xd8 jpeg %d \xff\xd9" % i) + member(b"%09d.txt" % i, b"caption %d" % i)
                    for i in range(count))


def end() -> bytes:
    return bytes(2 * BLOCK)


def bomb(total: int, kind: str = "gzip", member_size: int = 8 * MiB) -> bytes:
    """A valid tar of zero-filled members (`total` bytes of them), compressed: 1,028:1 (gzip), 6,800:1 (xz)."""
    out = zlib.compressobj(9, zlib.DEFLATED, 31) if kind == "gzip" else lzma.LZMACompressor(preset=0)
    chunks, zeros, i = [], bytes(member_size), 0
    for i in range(max(1, total // member_size)):
        chunks.append(out.compress(header(b"%09d.bin" % i, member_size)))
        chunks.append(out.compress(zeros))
    chunks.append(out.compress(end()))
    chunks.append(out.flush())
    return b"".join(chunks)


# name -> (bytes of the file, bytes of zeros appended as a sparse tail, what the reader must say)
@functools.lru_cache(maxsize=1)
def corpus() -> dict[str, tuple[bytes, int, str]]:
    """Every attack of issue 20, and damaged streams, with the words of the error expected."""
    good = good_samples()
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = 4096
            tar.addfile(info, io.BytesIO(random.Random(i).randbytes(4096)))  # incompressible: a cut loses data
    whole = plain.getvalue()
    big_pax = pax(pax_record(b"comment", b"c" * (MiB - 40)))
    return {
        # the hang: record length 0 never moves the parser on
        "pax_zero_length": (good + pax(b"0 path=x\n") + member(b"000000009.jpg", b"x") + end(), 0, "malformed pax record"),
        "pax_length_past_end": (good + pax(b"99999 path=x\n") + member(b"000000009.jpg", b"x"), 0, "malformed pax record"),
        "pax_length_not_a_number": (good + pax(b"1x path=x\n") + member(b"000000009.jpg", b"x"), 0, "malformed pax record"),
        "pax_size_not_a_number": (good + pax(pax_record(b"size", b"-1")) + member(b"000000009.jpg", b"x"), 0,
                                  "invalid pax size"),
        "pax_size_8gib": (good + pax(pax_record(b"size", b"%d" % (8 << 30))) + member(b"000000009.jpg", b"x"), 0,
                          "ReadLimits.member_bytes"),
        # octal -1 passed the checksum and read(-1) pulled the rest of the stream (here 200 MiB) into memory
        "size_minus_one": (good + header(b"000000009.jpg", size_field=b"-0000000001\0"), 200 * MiB, "invalid size field"),
        "size_8gib": (good + header(b"000000009.jpg", size_field=b"77777777777\0"), 200 * MiB, "ReadLimits.member_bytes"),
        "size_huge_base256": (good + header(b"000000009.jpg", size_field=b"\x80" + b"\xff" * 11), 0,
                              "ReadLimits.member_bytes"),
        "size_negative_base256": (good + header(b"000000009.jpg", size_field=b"\xff" * 12), 0, "negative size"),
        "size_plus_sign": (good + header(b"000000009.jpg", size_field=b"+0000000001\0"), 0, "invalid size field"),
        "pax_oversized": (good + big_pax + member(b"000000009.jpg", b"x"), 0, "ReadLimits.metadata_bytes"),
        "gnu_long_name_oversized": (good + member(b"././@LongLink", b"n" * MiB, b"L") + member(b"x.jpg", b"x"), 0,
                                    "ReadLimits.metadata_bytes"),
        "directory_8gib": (good + header(b"folder/", kind=b"5", size_field=b"77777777777\0"), 0,
                           "ReadLimits.member_bytes"),
        # 64 KiB of gzip and 8 KiB of xz: both stopped at ReadLimits.decompressed_floor (32 MiB)
        "gzip_bomb": (bomb(64 * MiB), 0, "the gzip stream inflates past 33554432 bytes"),
        "xz_bomb": (bomb(48 * MiB, "xz"), 0, "the xz stream inflates past 33554432 bytes"),
        "gzip_truncated": (gzip.compress(whole)[:6000], 0, "damaged gzip stream"),
        "gzip_garbage": (b"\x1f\x8b\x08\x00" + os.urandom(2000), 0, "damaged gzip stream"),
        "bzip2_garbage": (b"BZh9" + bytes(range(256)) * 8, 0, "damaged bzip2 stream"),
        "bzip2_truncated": (bz2.compress(whole)[:-50], 0, "damaged bzip2 stream"),
        "truncated_member": (whole[: BLOCK + 1000], 0, "unexpected end of data in the member at byte 0"),
        "truncated_header": (whole[: BLOCK + 4096 + 100], 0, "unexpected end of data in the header"),
        "bad_checksum": (good + header(b"000000009.jpg", 10)[:148] + b"0000000\0" + header(b"x", 10)[156:], 0,
                         "bad checksum"),
        "many_members_one_key": (b"".join(member(b"1.e%d" % i, b"") for i in range(300)), 0,
                                 "ReadLimits.sample_bytes / sample_members"),
    }


def write_corpus(folder: str) -> dict[str, str]:
    """Each corpus entry as a file under `folder`: {name: path}."""
    paths = {}
    for name, (data, tail, _) in corpus().items():
        path = os.path.join(folder, f"{name}.tar")
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(len(data) + tail)  # a sparse tail of zeros
        paths[name] = path
    return paths
