"""The embed stage beside its two limits, in one run: the model alone, and decoding alone.

For each model: write img2dataset-style shards of generated JPEGs (the download stage's default shard size; the
stage's costs per shard, a task and its output files, were a quarter of its steady time at 250 a shard), then measure
  - decode loop: one process, one core, that only decodes and resizes the same JPEGs to the model's input
    (pipeline.formats.decode, PIL draft mode): the physical limit per core of everything that is not the model;
  - bare forward: the model alone (`--threads` torch threads, the CLIP actor's) on pre-decoded, normalised
    pixels and pre-tokenized captions: the image and the caption forward the stage computes per sample; also
    with a thread per core, for reference (the stage gives the other cores to decoding and writing);
  - the stage: `dalle2 embed` as a user runs it (a fresh process that starts its own local Ray; EmbedConfig
    defaults but for the model, the batch size and, if --threads is not 1, the actor's threads), timed from
    command start to exit, with its summary's start-up steps and steady rate (after CLIP's first batch).
Prints one JSON line per model. tiny-clip stands for a GPU node, where the model is far faster than
decoding; ViT-B-32 for a CPU-bound model.

    python bench/embed.py [--images 4000] [--vit-images 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import yaml

from jobs import shapes
from pipeline.run.config import DownloadConfig, EmbedConfig
from pipeline.formats.decode import decode_resized
from pipeline.run.layout import RunLayout
from pipeline.formats.shard_reader import image_of, iter_samples
from pipeline.run.storage import list_files, read_json

DALLE2 = os.path.join(os.path.dirname(sys.executable), "dalle2")


def read_samples(root: str) -> tuple[list[bytes], list[str]]:
    """Every JPEG and caption of the run's shards, in shard order."""
    jpegs, captions = [], []
    for tar in sorted(list_files(RunLayout(root).shards, ".tar")):
        for _, fields in iter_samples(tar):
            jpegs.append(image_of(fields))
            captions.append(fields["txt"].decode())
    return jpegs, captions


def decode_loop(jpegs: list[bytes], size: int) -> float:
    """Images/s of decoding and resizing alone, in this one process."""
    start = time.perf_counter()
    for data in jpegs:
        decode_resized(data, size)
    return len(jpegs) / (time.perf_counter() - start)


def bare_forward(model_name: str, jpegs: list[bytes], captions: list[str], batch_size: int, threads: int) -> float:
    """Images/s of the model alone: image and caption forwards on inputs prepared beforehand."""
    from dalle2.clip import ClipAdapter, clip_preprocess

    torch.set_num_threads(threads)
    clip = ClipAdapter(model_name).eval()
    decoded = torch.from_numpy(np.stack([decode_resized(data, clip.image_size) for data in jpegs]))
    pixels = clip_preprocess(decoded.permute(0, 3, 1, 2).float() / 255, clip.image_size, clip.mean, clip.std)
    tokens = clip.tokenize(captions)
    batches = list(zip(pixels.split(batch_size), tokens.split(batch_size)))
    clip.embed_preprocessed(batches[0][0]), clip.embed_text(batches[0][1], trim_padding=True)  # warm-up
    start = time.perf_counter()
    for image_batch, token_batch in batches:
        clip.embed_preprocessed(image_batch)
        clip.embed_text(token_batch, trim_padding=True)
    return len(jpegs) / (time.perf_counter() - start)


def stage(root: str, model_name: str, images: int, batch_size: int, threads: int) -> dict:
    """`dalle2 embed` from command start to exit, and what its summary says of start-up and steady rate."""
    config = os.path.join(root, "run.yaml")
    embed = {"clip": {"model_name": model_name}, "batch_size": batch_size}
    if threads != 1:  # the default actor (cpus_per_actor 0.5) runs one torch thread
        embed.update(cpus_per_actor=threads, torch_threads=threads)
    with open(config, "w") as f:
        yaml.safe_dump({"root": root, "embed": embed}, f)
    start = time.perf_counter()
    subprocess.run([DALLE2, "embed", "--config", config], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    summary = read_json(RunLayout(root).ledger_summary("embed"))
    assert summary["written"] == images, summary
    return {"stage_wall_s": round(seconds, 2), "stage_images_per_s": round(images / seconds, 1),
            "stage_startup_s": summary["startup_s"], "stage_startup_steps": summary["startup_steps"],
            "stage_steady_images_per_s": summary["steady_rows_per_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--vit-images", type=int, default=512, help="ViT-B-32 runs about 10 img/s per core on CPU")
    parser.add_argument("--threads", type=int, default=1, help="the CLIP actor's torch threads, and the bare forward's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from dalle2.clip_spec import clip_input_spec

    # tiny-clip at the EmbedConfig default; ViT-B-32 at a smaller batch, or a CPU run of a few hundred images would
    # be too few batches for a steady rate
    default_batch = EmbedConfig().batch_size
    for model_name, images, batch_size in (("tiny-clip", args.images, default_batch), ("ViT-B-32", args.vit_images, 32)):
        with tempfile.TemporaryDirectory() as root:
            shapes.write_shards(root, images, per_shard=DownloadConfig().samples_per_shard)
            jpegs, captions = read_samples(root)
            size = clip_input_spec(model_name)[0]
            result = stage(root, model_name, images, batch_size, args.threads)
            decode_rate = decode_loop(jpegs, size)
            bare_rate = bare_forward(model_name, jpegs, captions, batch_size, args.threads)
            all_cores = bare_forward(model_name, jpegs, captions, batch_size, os.cpu_count() or 1)
        steady = result["stage_steady_images_per_s"]
        print(json.dumps({"model": model_name, "images": images, "batch_size": batch_size, "threads": args.threads,
                          "decode_loop_images_per_s": round(decode_rate, 1),
                          "bare_forward_images_per_s": round(bare_rate, 1),
                          "bare_forward_all_cores_images_per_s": round(all_cores, 1), **result,
                          "steady_vs_bare_forward": round(steady / bare_rate, 3),
                          "steady_vs_decode_loop": round(steady / decode_rate, 3)}), flush=True)


if __name__ == "__main__":
    main()
