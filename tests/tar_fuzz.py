"""The tar reader's fuzzer, shared by tests/test_fuzz.py (a few hundred examples) and bench/fuzz_reader.py (N
minutes): hypothesis strategies for structurally plausible shards (valid checksums around mutated sizes, types,
pax records and names, whole streams compressed, cut short or with a byte flipped), so that inputs get past the
checksum into the deep paths, and `check`, which fails on anything but the reader's own error, on a read over
a second and on memory over a cap."""

from __future__ import annotations

import bz2
import gc
import gzip
import lzma
import os
import signal
import tracemalloc

from hypothesis import strategies as st

from tests.malformed_tars import BLOCK, checksummed, end, header, member, pax, pax_record

SECONDS = 1.0  # a read of one fuzzed shard (a few KiB) taking longer hangs
PEAK_BYTES = 48 << 20  # ReadLimits.decompressed_floor (32 MiB) may be inflated and held as one member, and more

# sizes a hostile header might declare: the attacks of issue 20 and the edges of each cap
SIZE_FIELDS = st.one_of(
    st.integers(0, 4096).map(lambda n: b"%011o\0" % n),
    st.sampled_from([b"-0000000001\0", b"+0000000001\0", b"77777777777\0", b"0o777\0     ", b"1_0\0        ",
                     b"\x80" + b"\xff" * 11, b"\xff" * 12, b"\x80" + bytes(10) + b"\x05", b"00000200000\0",
                     b"00400000001\0", b"           ", b"\0" * 12]),
    st.binary(min_size=12, max_size=12),
)
# pax headers and GNU long names weighted up: their parsing is where the hang and ballooning were
KINDS = st.one_of(st.sampled_from([b"0", b"x", b"L"]),
                  st.sampled_from([b"0", b"\0", b"7", b"5", b"2", b"1", b"x", b"g", b"L", b"K", b"S", b"V", b"\xff"]))
NAMES = st.one_of(st.integers(0, 20).map(lambda i: b"%09d.%s" % (i, b"jpg")),
                  st.tuples(st.integers(0, 20), st.sampled_from([b"jpg", b"txt", b"json", b"PNG", b"tar.gz", b""]))
                  .map(lambda t: b"%d.%s" % t),
                  st.binary(max_size=120))
PAX_RECORDS = st.lists(st.one_of(
    st.tuples(st.sampled_from([b"path", b"size", b"linkpath", b"comment", b""]), st.binary(max_size=40))
    .map(lambda kv: pax_record(*kv)),
    st.tuples(st.integers(-3, 3), st.sampled_from([b"path", b"size"]), st.binary(max_size=20))  # lengths off by a few
    .map(lambda t: (lambda r: str(max(0, int(r.split(b" ")[0]) + t[0])).encode() + r[r.index(b" "):])(pax_record(t[1], t[2]))),
    st.sampled_from([b"0 path=x\n", b"99999 path=x\n", b"5 a=b\n", b"12 size=-1\n", b"30 size=99999999999999999999\n",
                     pax_record(b"size", b"9" * 5000), pax_record(b"path", "\udcff".encode("utf-8", "surrogatepass"))]),
    st.binary(max_size=30),
), max_size=4).map(b"".join)


@st.composite
def members(draw) -> bytes:
    """One member: a header with a valid checksum (its size field maybe a lie), its data and padding."""
    kind = draw(KINDS)
    data = draw(PAX_RECORDS) if kind in (b"x", b"g") and draw(st.integers(0, 3)) else draw(st.binary(max_size=1500))
    block = bytearray(header(draw(NAMES), len(data), kind, ustar=draw(st.booleans())))
    if draw(st.integers(0, 3)) == 0:
        block[124:136] = draw(SIZE_FIELDS)
    if draw(st.integers(0, 5)) == 0:  # a prefix field (ustar joins it to the name)
        block[345:345 + 20] = draw(st.binary(min_size=20, max_size=20))
    return checksummed(block) + data + bytes(-len(data) % BLOCK)


# the attacks as members, dropped among the generated ones (hypothesis favours small, plain examples:
# alone it put `0 path=x` in 1 shard of 300)
ATTACKS = st.sampled_from([
    pax(b"0 path=x\n"), pax(b"99999 path=x\n"), pax(pax_record(b"size", b"9" * 5000)), pax(pax_record(b"size", b"-1")),
    pax(pax_record(b"size", b"%d" % (8 << 30))), pax(b"12 path=x\n" * 3), member(b"././@LongLink", b"n" * 70000, b"L"),
    header(size_field=b"-0000000001\0") + bytes(4096), header(size_field=b"77777777777\0"),
    header(size_field=b"\x80" + b"\xff" * 11), header(size_field=b"\xff" * 12), header(kind=b"5", size_field=b"77777777777\0"),
])


@st.composite
def shards(draw) -> bytes:
    """A whole shard: members (one an attack, often), maybe end blocks, then maybe damaged, then maybe compressed
    (and damaged again)."""
    parts = draw(st.lists(members(), min_size=1, max_size=6))
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), draw(ATTACKS))
    data = b"".join(parts) + (end() if draw(st.booleans()) else b"")
    damage = draw(st.sampled_from(["none", "none", "cut", "flip"]))
    if damage == "cut" and data:
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    wrap = draw(st.sampled_from(["none", "none", "gzip", "bzip2", "xz"]))
    if wrap != "none":
        data = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}[wrap](data)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
    return data


# the kinds of the reader's errors, by the words of their reasons: the fuzzer should reach each one
OUTCOMES = (("bad checksum", "checksum"), ("end of data", "cut short"), ("pax", "pax"), ("ReadLimits", "over a cap"),
            ("invalid size", "size field"), ("negative size", "size field"), ("damaged", "damaged stream"))


class ReadTooLong(Exception):
    """Raised by the alarm inside a read that takes more than SECONDS of CPU time."""


def _alarm(*_):
    raise ReadTooLong(f"a read still running after {SECONDS} s")


class Checker:
    """Reads fuzzed shards through iter_samples from one scratch file; `check` raises AssertionError on a
    finding. Memory is measured by tracemalloc (Python's allocations: every bytes object the reader holds)."""

    def __init__(self, folder: str, measure_memory: bool = True):
        self.path = os.path.join(folder, "shard.tar")
        self.measure_memory, self.executions = measure_memory, 0
        signal.signal(signal.SIGPROF, _alarm)  # CPU time of this process: a loaded machine does not count

    def check(self, data: bytes) -> str:
        """What the reader made of `data`: "read" (samples came out) or the kind of ShardReadError it raised."""
        from pipeline.formats.shard_reader import ShardReadError, iter_samples

        with open(self.path, "wb") as f:
            f.write(data)
        self.executions += 1
        if self.measure_memory:
            tracemalloc.start()
        # the garbage collector is held off while a read is timed: a full collection of hypothesis's heap under
        # tracemalloc once took 0.65 s inside the read of a 512-byte shard (0.7 ms again alone)
        gc.disable()
        signal.setitimer(signal.ITIMER_PROF, SECONDS)
        outcome = "read"
        try:
            for _key, fields in iter_samples(self.path):
                assert isinstance(fields, dict)
        except ShardReadError as error:
            outcome = next((kind for words, kind in OUTCOMES if words in error.reason), "other")
        except ReadTooLong as error:
            raise AssertionError(f"{error} on a {len(data)}-byte shard") from None
        except Exception as error:  # noqa: BLE001 - the finding
            raise AssertionError(f"{type(error).__name__} escaped the reader: {error}") from error
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            gc.enable()
            if self.measure_memory:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        if self.measure_memory:
            assert peak <= PEAK_BYTES, f"peak {peak >> 20} MiB over {PEAK_BYTES >> 20} MiB on a {len(data)}-byte shard"
        return outcome
