"""Decoder training steps/s with batches streamed from shards versus the same batches held in memory.

Writes 64 px shards of generated images with aligned embeddings, then times the same number of
decoder training steps twice in one process: fed by ImageBatches (read tar, decode, join embeddings,
shuffle buffer) and fed from a list of the very same batches. Prints one JSON line (target >= 0.9).

    python bench/loader.py [--steps 20] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from dalle2 import Decoder, DecoderTrainer, Unet
from pipeline.formats.aligned import align, write_aligned
from pipeline.run.layout import RunLayout, index_width
from pipeline.loaders.batches import ImageBatches
from pipeline.loaders.plan import SamplePlan
from jobs.shapes import write_shards

DIM = 64


def make_run(root: str, count: int, per_shard: int, size: int) -> None:
    write_shards(root, count, per_shard=per_shard, size=size)
    rng = np.random.default_rng(0)
    for shard_id, start in enumerate(range(0, count, per_shard)):
        n = min(per_shard, count - start)
        emb = rng.standard_normal((n, DIM)).astype(np.float16)
        write_aligned(RunLayout(root), f"{shard_id:05d}",
                      align(shard_id, n, 5, index_width(per_shard), np.arange(n), emb, emb, [""] * n))


def timed_steps(trainer: DecoderTrainer, batches, steps: int) -> float:
    """Steps/s over `steps` steps drawn from the iterable `batches` (after one warm-up step)."""
    iterator = iter(batches)
    first = next(iterator)
    trainer.train_step({"image": first["image"], "image_embed": first["image_embed"]})
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
        trainer.train_step({"image": batch["image"], "image_embed": batch["image_embed"]})
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    count = (args.steps + 1) * args.batch_size
    with tempfile.TemporaryDirectory() as root:
        make_run(root, count, per_shard=64, size=64)
        loader = ImageBatches(root, SamplePlan.from_aligned(root), args.batch_size, shuffle_buffer=64, image_size=64)

        def fresh_trainer() -> DecoderTrainer:
            torch.manual_seed(0)
            unet = Unet(dim=32, dim_mults=(1, 2, 4), image_embed_dim=DIM, cond_dim=64, learned_variance=True)
            return DecoderTrainer(Decoder(unet=unet, image_sizes=64, timesteps=100))

        in_memory = list(loader.epoch(0))
        memory_rate = timed_steps(fresh_trainer(), in_memory, args.steps)
        streamed_rate = timed_steps(fresh_trainer(), loader.epoch(0), args.steps)
    print(json.dumps({"image_size": 64, "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
                      "streamed_steps_per_s": round(streamed_rate, 3), "in_memory_steps_per_s": round(memory_rate, 3),
                      "ratio": round(streamed_rate / memory_rate, 3)}))


if __name__ == "__main__":
    main()
