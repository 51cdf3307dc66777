"""The tar reader against Python's tarfile: the same members from every format and compression tarfile writes,
and a clear error for damaged streams."""

import io
import tarfile

import pytest

from pipeline.shard_reader import iter_members, iter_samples

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
