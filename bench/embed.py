"""Embed-stage throughput against the same model's bare forward, in one run.

For each model: write shards of generated 64 px JPEGs (as img2dataset lays them out), run the embed
stage on a local Ray (decode tasks + one CLIP actor), then time the bare image forward of the same
model on pre-decoded, preprocessed tensors in this process at the same batch size. Prints one JSON
line per model with both rates and their ratio (target >= 0.8 on CPU).

    python bench/embed.py [--images 2000] [--vit-images 512]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import numpy as np
import torch

from pipeline import shapes
from pipeline.config import EmbedConfig


def write_shards(root: str, images: int, size: int = 64) -> tuple[list[np.ndarray], list[str]]:
    """img2dataset-style shards of generated JPEGs; returns the images and captions for the baseline."""
    samples = shapes.write_shards(root, images, per_shard=250, size=size)
    return [np.asarray(image, dtype=np.float32) / 255 for _, image in samples], [spec.caption for spec, _ in samples]


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
