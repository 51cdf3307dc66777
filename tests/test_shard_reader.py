"""The tar reader against Python's tarfile: the same members from every format and compression tarfile writes,
and a clear error for damaged streams."""

import io
import tarfile

import pytest

from pipeline.formats.shard_reader import iter_members, iter_samples

LONG_DIR = "a-folder-whose-name-is-long-enough/" * 4  # 140 characters: ustar needs its prefix field, others more


def members(format: int) -> list[tuple[str, bytes]]:
    """Files a writer might put in a shard: short and long names, a folder, binary data, a unicode name."""
    return [("000000000.jpg", b"\xff\xd8 jpeg bytes \xff\xd9"), ("000000000.txt", b"a red square"),
            (LONG_DIR + "000000001.jpg", bytes(range(256)) * 3), (LONG_DIR + "000000001.txt", b""),
            ("caf\u00e9/000000002.json", b'{"width": 64}'),
            ("x" * 120 + ".jpg", b"long name") if format != tarfile.USTAR_FORMAT else ("y.jpg", b"y")]


def write_tar(path, format: int = tarfile.PAX_FORMAT, mode: str = "w") -> list[tuple[str, bytes]]:
    files = members(format)
    with tarfile.open(path, mode, format=format) as tar:
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "000000000.jpg"
        tar.addfile(link)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return files


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["pax", "gnu", "ustar"])
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_reads_what_tarfile_writes(tmp_path, format, mode):
    path = tmp_path / "shard.tar"
    files = write_tar(path, format=format, mode=mode)
    with tarfile.open(path) as tar:  # tarfile's own reading, as the reference
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert expected == files
    samples = list(iter_samples(str(path)))
    keys = [key for key, _ in samples]
    assert keys[:3] == ["000000000", "000000001", "000000002"] and len(samples) == 4
    assert samples[0][1] == {"jpg": files[0][1], "txt": files[1][1]}
    assert samples[1][1] == {"jpg": files[2][1], "txt": b""}
    if mode == "w":
        with open(path, "rb") as f:
            assert list(iter_members(f)) == expected


def test_a_repeated_key_is_kept_apart(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("1.jpg", "1.txt", "1.jpg", "1.txt", "2.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    assert [(key, sorted(fields)) for key, fields in iter_samples(str(path))] == [
        ("1", ["jpg", "txt"]), ("1", ["jpg", "txt"]), ("2", ["jpg"])]


def test_damaged_streams_raise_with_where(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, format=tarfile.USTAR_FORMAT)
    data = path.read_bytes()
    offsets = []
    with open(path, "rb") as f:  # where each header sits, from tarfile
        offsets = [m.offset for m in tarfile.open(fileobj=f)]

    flipped = bytearray(data)
    flipped[offsets[3] + 10] ^= 0x01  # one bit of the fourth member's name
    with pytest.raises(tarfile.ReadError, match=f"invalid header at byte {offsets[3]} "):
        list(iter_members(io.BytesIO(bytes(flipped))))

    with pytest.raises(tarfile.ReadError, match="invalid header at byte 0 "):
        list(iter_members(io.BytesIO(b"this is not a tar file at all" * 100)))

    cut = data[: offsets[4] + 512 + 100]  # inside the fifth member's data
    with pytest.raises(tarfile.ReadError, match=f"unexpected end of data in the member at byte {offsets[4]}"):
        list(iter_members(io.BytesIO(cut)))

    # a stream that stops at a member boundary (no end-of-archive blocks) is read to there, as tarfile does
    assert len(list(iter_members(io.BytesIO(data[: offsets[4]])))) == 2


# The corpus is read in a child process under RLIMIT_AS (its address space at start + 512 MiB), so a reader that
# balloons fails there with MemoryError instead of taking the test machine down, and a hang is cut by an alarm.
CORPUS_CHILD = r"""
import json, resource, signal, sys
from pipeline.formats.shard_reader import ShardReadError, iter_samples

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (512 << 20), resource.RLIM_INFINITY))

def alarm(*_):
    raise TimeoutError("still reading after 5 s")

signal.signal(signal.SIGALRM, alarm)
results = {}
for name, path in json.loads(sys.argv[1]).items():
    before = resource.getrusage(resource.RUSAGE_SELF)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        samples = sum(1 for _ in iter_samples(path))
        error = None
    except BaseException as e:  # MemoryError and TimeoutError included: the parent names them
        samples, error = None, (type(e).__name__, isinstance(e, ShardReadError), str(e), getattr(e, "kind", None))
    signal.setitimer(signal.ITIMER_REAL, 0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds, not wall time: the reader's own work, whatever else the machine runs (a hang: the alarm)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    results[name] = {"seconds": cpu, "grew": (after.ru_maxrss - before.ru_maxrss) * 1024, "samples": samples,
                     "error": error}
print(json.dumps(results))
"""


def kind_of(words: str) -> str:
    """The ShardReadError kind (a fixed vocabulary) an attack's expected error words belong to."""
    from pipeline.formats import shard_reader as r

    for part, kind in (("pax", r.PAX_RECORD), ("ReadLimits", r.OVER_LIMIT), ("inflates past", r.OVER_LIMIT),
                       ("size field", r.BAD_FIELD), ("negative size", r.BAD_FIELD), ("damaged", r.DAMAGED_STREAM),
                       ("unexpected end", r.CUT_SHORT), ("bad checksum", r.BAD_CHECKSUM)):
        if part in words:
            return kind
    raise AssertionError(f"no kind for {words!r}")


def test_every_attack_raises_the_readers_error_fast_in_bounded_memory(tmp_path):
    import json
    import subprocess
    import sys

    from tests.malformed_tars import corpus, write_corpus

    expected = {name: words for name, (_, _, words) in corpus().items()}
    paths = write_corpus(str(tmp_path))
    child = subprocess.run([sys.executable, "-c", CORPUS_CHILD, json.dumps(paths)], capture_output=True, text=True,
                           timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    wrong = {}
    for name, result in results.items():
        error = result["error"]
        if error is None or not error[1] or expected[name] not in error[2] or paths[name] not in error[2]:
            wrong[name] = f"wanted ShardReadError naming the file with {expected[name]!r}, got {error or result}"
        elif error[3] != kind_of(expected[name]):
            wrong[name] = f"kind {error[3]!r}, wanted {kind_of(expected[name])!r}"
        # a bomb's 32 MiB inflate in about 0.2 s of CPU; 1.5 x ReadLimits.member_bytes
        elif result["seconds"] > 1.0 or result["grew"] > 96 << 20:
            wrong[name] = f"{result['seconds']:.2f} s, peak RSS +{result['grew'] >> 20} MiB"
    assert not wrong and len(results) == len(expected) >= 23, wrong


def test_the_readers_error_is_a_tarfile_error_naming_the_shard(tmp_path):
    from pipeline.formats.shard_reader import ShardReadError

    path = tmp_path / "00003.tar"
    path.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(tarfile.ReadError) as caught:  # what callers catching tarfile's error see
        list(iter_samples(str(path)))
    assert isinstance(caught.value, ShardReadError) and caught.value.url == str(path)
    assert str(caught.value) == f"{path}: invalid header at byte 0 (not a tar member: bad checksum)"
    assert caught.value.reason == "invalid header at byte 0 (not a tar member: bad checksum)"


def test_limits_are_configurable_and_sizes_within_them_read(tmp_path):
    from pipeline.formats.shard_reader import ReadLimits, ShardReadError
    from tests.malformed_tars import end, member, pax, pax_record

    # a pax `size` replaces the member's own (tarfile writes one for members over 8 GiB); a long pax path is read
    data = (pax(pax_record(b"size", b"5") + pax_record(b"path", b"d/" + b"p" * 300 + b".jpg")) + member(b"x.jpg", b"")[:512]
            + b"hello" + bytes(507) + member(b"1.txt", b"t" * 2000) + end())
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    assert [(k, f) for k, f in iter_samples(str(path))] == [("p" * 300, {"jpg": b"hello"}), ("1", {"txt": b"t" * 2000})]
    with pytest.raises(ShardReadError, match=r"the member at byte 2048 declares 2000 bytes, over the 1999-byte limit "
                                             r"\(ReadLimits.member_bytes\)"):
        list(iter_samples(str(path), ReadLimits(member_bytes=1999)))
    with pytest.raises(ShardReadError, match=r"the x header at byte 0 declares \d+ bytes, over the 100-byte limit"):
        list(iter_samples(str(path), ReadLimits(metadata_bytes=100)))
    with pytest.raises(ShardReadError, match="ReadLimits.sample_bytes"):
        list(iter_samples(str(path), ReadLimits(sample_bytes=1000)))


def test_a_gzip_shard_inflates_up_to_its_cap(tmp_path):
    import gzip

    from pipeline.formats.shard_reader import ReadLimits, ShardReadError
    from tests.malformed_tars import end, good_samples

    data = good_samples(200) + end()  # headers and padding: mostly zeros, about 60:1 under gzip
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(gzip.compress(data))
    assert len(data) > 40 * len(path.read_bytes())
    assert len(list(iter_samples(str(path), ReadLimits(decompressed_floor=0)))) == 200  # 100:1 holds it
    with pytest.raises(ShardReadError, match="inflates past"):
        list(iter_samples(str(path), ReadLimits(decompressed_floor=0, decompressed_ratio=20)))
    cap = len(data) - 2 * 512 - 1  # the reader stops at the first end-of-archive block
    with pytest.raises(ShardReadError, match=f"the gzip stream inflates past {cap} bytes"):
        list(iter_samples(str(path), ReadLimits(decompressed_bytes=cap)))


def test_a_fifo_with_a_writer_is_the_readers_error_not_a_regular_file(tmp_path):
    import os
    import threading

    from pipeline.formats.shard_reader import NOT_REGULAR, ShardReadError

    fifo = str(tmp_path / "00000.tar")
    os.mkfifo(fifo)

    def writer():
        try:
            with open(fifo, "wb") as f:  # blocks until the reader opens it
                f.write(b"\0" * 4096)
        except BrokenPipeError:  # the reader gave up first
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with pytest.raises(ShardReadError) as caught:
        list(iter_samples(fifo))
    thread.join()
    assert caught.value.kind == NOT_REGULAR and caught.value.url == fifo and "not a regular file" in str(caught.value)
