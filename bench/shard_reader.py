"""The project's tar reader (pipeline/formats/shard_reader.py) beside webdataset's tar expansion and key grouping.

    python bench/shard_reader.py [--samples 5000]

Prints samples/s of both over the same local shard, and what each does with a shard that holds one sample
twice (img2dataset writes that when a retried task appends to a partly written tar): ours yields both
copies for the stage to count; webdataset's group_by_keys raises and loses the rest of the shard.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time


def write_tar(path: str, samples: int, duplicate: bool = False) -> None:
    """A shard of `samples` 32 px JPEGs with captions (optionally the second sample written twice)."""
    from jobs.shapes import generate

    with tarfile.open(path, "w") as tar:
        for i, (spec, image) in enumerate(generate(samples, size=32)):
            jpg = io.BytesIO()
            image.save(jpg, format="JPEG", quality=90)
            for _ in range(2 if duplicate and i == 1 else 1):
                for ext, data in (("jpg", jpg.getvalue()), ("txt", spec.caption.encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def ours(path: str) -> int:
    from pipeline.formats.shard_reader import iter_samples

    return sum(1 for _ in iter_samples(path))


def webdataset_grouping(path: str) -> int:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as f:
        files = ({**sample, "__url__": path} for sample in tar_file_iterator(f))
        return sum(1 for _ in group_by_keys(files))


def rate(fn, path: str, repeats: int = 3) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        count = fn(path)
        best = min(best, time.perf_counter() - started)
    return count / best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        clean, twice = os.path.join(folder, "clean.tar"), os.path.join(folder, "twice.tar")
        write_tar(clean, args.samples)
        write_tar(twice, 100, duplicate=True)
        ours_rate, n = rate(ours, clean)
        wds_rate, m = rate(webdataset_grouping, clean)
        print(f"clean shard of {args.samples}: ours {ours_rate:,.0f} samples/s ({n}), "
              f"webdataset {wds_rate:,.0f} samples/s ({m}); ratio ours/webdataset {ours_rate / wds_rate:.2f}")
        print(f"shard with one sample twice (100 samples): ours yields {ours(twice)} (the copy counted apart)")
        try:
            print(f"  webdataset yields {webdataset_grouping(twice)}")
        except ValueError as error:
            print(f"  webdataset raises ValueError: {str(error)[:90]}")


if __name__ == "__main__":
    main()
