"""Embed-stage throughput against the same model's bare forward, in one run.

For each model: write shards of generated 64 px JPEGs (as img2dataset lays them out), run the embed
stage on a local Ray (decode tasks + one CLIP actor), then time the bare image forward of the same
model on pre-decoded, preprocessed tensors in this process at the same batch size. Prints one JSON
line per model with both rates and their ratio (target >= 0.8 on CPU).

    python bench/embed.py [--images 2000] [--vit-images 512]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import EmbedConfig
from pipeline.layout import RunLayout, make_key, shard_name
from pipeline.shapes import generate
from pipeline.storage import write_json, write_parquet


def write_shards(root: str, images: int, per_shard: int = 250, size: int = 64) -> tuple[list[np.ndarray], list[str]]:
    """img2dataset-style shards of generated JPEGs; returns the decoded images for the bare baseline."""
    layout = RunLayout(root)
    decoded, captions, samples = [], [], list(generate(images, size=size))
    for shard_id, start in enumerate(range(0, images, per_shard)):
        name, chunk = shard_name(shard_id), samples[start : start + per_shard]
        keys = [make_key(shard_id, i, 5, 3) for i in range(len(chunk))]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for key, (spec, image) in zip(keys, chunk):
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG", quality=95)
                for ext, data in (("jpg", jpg.getvalue()), ("txt", spec.caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                decoded.append(np.asarray(image, dtype=np.float32) / 255)
                captions.append(spec.caption)
        with _open(layout.shard_tar(name)) as f:
            f.write(buffer.getvalue())
        write_parquet(layout.shard_parquet(name), pa.table({"key": keys, "status": ["success"] * len(keys)}))
        write_json(layout.shard_stats(name), {"count": len(keys), "successes": len(keys)})
    return decoded, captions


def _open(path: str):
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "wb")


def bare_forward(model_name: str, decoded: list[np.ndarray], captions: list[str], batch_size: int,
                 threads: int) -> float:
    """Images/s of the model alone on pre-decoded, preprocessed tensors and pre-tokenized captions:
    the image forward plus the caption forward, the two things the stage computes per sample."""
    from dalle2.clip import ClipAdapter

    torch.set_num_threads(threads)
    clip = ClipAdapter(model_name).eval()
    pixels = clip.preprocess(torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2))
    tokens = clip.tokenize(captions)
    batches = list(zip(pixels.split(batch_size), tokens.split(batch_size)))
    clip.embed_preprocessed(batches[0][0]), clip.embed_text(batches[0][1])  # warm-up
    start = time.perf_counter()
    for image_batch, token_batch in batches:
        clip.embed_preprocessed(image_batch)
        clip.embed_text(token_batch)
    return len(decoded) / (time.perf_counter() - start)


def stage(root: str, model_name: str, images: int, batch_size: int, threads: int) -> float:
    """Images/s of the whole embed stage (read, decode, preprocess, embed images and captions, write)."""
    from pipeline.embed import run_embed

    config = EmbedConfig(clip={"model_name": model_name}, batch_size=batch_size, cpus_per_actor=threads,
                         torch_threads=threads, write_clip_retrieval=True)
    start = time.perf_counter()
    summary = run_embed(config, root)
    seconds = time.perf_counter() - start
    assert summary["written"] == images, summary
    return images / seconds, summary["steady_rows_per_s"], summary["startup_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--vit-images", type=int, default=512, help="ViT-B-32 runs about 10 img/s per core on CPU")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    for model_name, images, batch_size in (("tiny-clip", args.images, 64), ("ViT-B-32", args.vit_images, 32)):
        with tempfile.TemporaryDirectory() as root:
            decoded, captions = write_shards(root, images)
            stage_rate, steady_rate, startup = stage(root, model_name, images, batch_size, args.threads)
            bare_rate = bare_forward(model_name, decoded, captions, batch_size, args.threads)
        print(json.dumps({"model": model_name, "images": images, "batch_size": batch_size, "threads": args.threads,
                          "bare_forward_images_per_s": round(bare_rate, 1),
                          "stage_images_per_s": round(stage_rate, 1), "ratio": round(stage_rate / bare_rate, 3),
                          "stage_startup_s": startup, "stage_steady_images_per_s": steady_rate,
                          "steady_ratio": round(steady_rate / bare_rate, 3)}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
