"""The GPU paths, end to end on one CUDA machine: what the test suite (CPU only) cannot run.

On a local run root of generated 256 px shards it runs, through the same job entry points a cluster uses:
the embed stage on a GPU actor with fp16 autocast (ViT-B-32, randomly initialised: nothing downloads),
train-prior (`vit-b-32`, text-conditioned) and train-decoder (`cascade-64-256`, unet 1 text-conditioned)
for a few steps with `use_gpu` and bf16, then samples 256 px images from the checkpoints on the GPU.
Prints one JSON line per stage: seconds, throughput and the peak GPU memory in use (all processes, sampled).

    python bench/gpu_check.py [--images 512] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time


class GpuMemoryPeak:
    """The highest GPU memory in use while the block runs, sampled every 50 ms (Ray workers included)."""

    def __enter__(self) -> "GpuMemoryPeak":
        import torch

        self.peak, self.running = 0, True

        def sample() -> None:
            while self.running:
                free, total = torch.cuda.mem_get_info()
                self.peak = max(self.peak, total - free)
                time.sleep(0.05)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device: this check is for a GPU machine"}))
        return

    from jobs import embed, train_decoder, train_prior
    from jobs.run_config import load_run_config
    from jobs.stage import parse_run_config, run_session, run_stage
    from jobs.sample import generate
    from jobs.shapes import write_shards

    root = tempfile.mkdtemp(prefix="gpu-check-")
    write_shards(root, args.images, per_shard=256, size=256)
    steps = args.steps
    overrides = [
        f"root={root}", "ray.num_cpus=8",
        "train_clip.enabled=false", "embed.clip.model_name=ViT-B-32", "embed.batch_size=256", "embed.actors=1",
        "embed.num_gpus_per_actor=1", "embed.cpus_per_actor=2", "embed.decode_concurrency=4", "embed.autocast=fp16",
        "train_prior.prior=vit-b-32", "train_prior.use_gpu=true", "train_prior.workers=1", "train_prior.cpus_per_worker=2",
        "train_prior.batch_size=128", f"train_prior.max_steps={steps}", f"train_prior.eval_every={steps}",
        f"train_prior.checkpoint_every={steps}", "train_prior.eval_size=64", "train_prior.epochs=100",
        "train_prior.trainer.amp=bf16",
        "train_decoder.decoder=cascade-64-256", "train_decoder.use_gpu=true", "train_decoder.workers=1",
        "train_decoder.cpus_per_worker=2", "train_decoder.batch_size=16", f"train_decoder.max_steps={steps}",
        f"train_decoder.eval_every={steps}", f"train_decoder.checkpoint_every={steps}", "train_decoder.eval_size=8",
        "train_decoder.eval_samples=4", "train_decoder.epochs=100", "train_decoder.trainer.amp=bf16",
    ]
    config = parse_run_config([x for s in overrides for x in ("--set", s)], "gpu check")
    with run_session(config) as session:  # one Ray for the three stages, as `dalle2 run` has
        for name, job, work in (("embed", embed, args.images), ("train-prior", train_prior, steps * 128),
                                ("train-decoder", train_decoder, steps * 16)):
            started = time.time()
            with GpuMemoryPeak() as memory:
                summary = run_stage(job.STAGE, config, session)
            seconds = time.time() - started
            unit = "images/s" if name == "embed" else "samples/s (incl. start-up and evaluation)"
            print(json.dumps({"stage": name, "seconds": round(seconds, 1), unit: round(work / seconds, 1),
                              "peak_gpu_memory_gib": round(memory.peak / 2**30, 2),
                              "loss": summary.get("loss"), "failed": summary.get("failed")}), flush=True)

    started = time.time()
    with GpuMemoryPeak() as memory:
        images = generate(load_run_config(root).root, ["a red circle on the left", "a blue square"], n=2,
                          device="cuda")
    print(json.dumps({"stage": "sample", "seconds": round(time.time() - started, 1), "images": list(images.shape),
                      "peak_gpu_memory_gib": round(memory.peak / 2**30, 2)}), flush=True)


if __name__ == "__main__":
    main()
