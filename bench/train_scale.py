"""Training at scale, side by side in one run: step time and peak memory of a unet on 2 gloo workers with the old
flat all-reduce (the baseline), with DistributedDataParallel and sharded with FSDP2 (`parallel: fsdp`), each with
and without gradient checkpointing; and a 128 px upsampler trained on whole images vs on 32 px random crops.

    python bench/train_scale.py            # every case, one JSON line each, then a table

Each case runs in fresh processes (2 ranks, one thread each: this machine's 2 cores), so its peak memory is its own:
`extra_peak_mb` is the rise of rank 0's peak RSS over what it held once the model and batch were built (Adam's
moments, gradients, activations, communication buffers); `held_mb` the parameters rank 0 keeps between steps.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

WARMUP, ITERS = 2, 5
UNET = dict(dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2, image_embed_dim=64, cond_dim=64, attn_heads=4,
            attn_dim_head=32, layer_attns=(False, False, True))
CASES = {
    # name: (workers, sync, gradient checkpointing, image sizes, crop of the last unet, batch per rank)
    "unet64_flat_allreduce": (2, "flat", False, (64,), None, 8),
    "unet64_ddp": (2, "ddp", False, (64,), None, 8),
    "unet64_fsdp": (2, "fsdp", False, (64,), None, 8),
    "unet64_flat_allreduce_checkpointing": (2, "flat", True, (64,), None, 8),
    "unet64_ddp_checkpointing": (2, "ddp", True, (64,), None, 8),
    "unet64_fsdp_checkpointing": (2, "fsdp", True, (64,), None, 8),
    "upsampler128_whole": (1, "ddp", False, (32, 128), None, 4),
    "upsampler128_crops32": (1, "ddp", False, (32, 128), 32, 4),
}


def flat_allreduce_step(trainer, part: int) -> None:
    """The baseline: what the trainer did before DDP: after backward, every gradient copied into one flat tensor,
    all-reduced once (no overlap with the backward pass, gradient memory twice)."""
    import torch.distributed as dist

    params = [p for p in trainer.parts[part].parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def run_case(rank: int, name: str, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    from dalle2 import Decoder, DecoderTrainer
    from dalle2.parallel import local

    workers, sync, checkpointing, sizes, crop, batch = CASES[name]
    torch.set_num_threads(1)
    if workers > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=workers)
    torch.manual_seed(0)
    unets = [UNET] + [{**UNET, "lowres_cond": True, "dim": 32}] * (len(sizes) - 1)
    crops = None if crop is None else (None,) * (len(sizes) - 1) + (crop,)
    decoder = Decoder(unets=unets, image_sizes=sizes, timesteps=100, random_crop_sizes=crops)
    number = len(sizes)
    trainer = DecoderTrainer(decoder, unet_numbers=[number], gradient_checkpointing=checkpointing,
                             parallel="fsdp" if sync == "fsdp" else "ddp")
    if sync == "flat":
        trainer.replicas = [None]
        step = trainer._optimizer_step
        trainer._optimizer_step = lambda part: (flat_allreduce_step(trainer, part), step(part))[1]
    data = {"image": torch.rand(batch, 3, sizes[-1], sizes[-1]), "image_embed": torch.randn(batch, 64)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(WARMUP):
        trainer.train_step(data, unet_number=number)
    if workers > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(ITERS):
        trainer.train_step(data, unet_number=number)
    seconds = (time.perf_counter() - start) / ITERS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"case": name, "workers": workers, "step_s": round(seconds, 3),
                       "samples_per_s": round(batch * workers / seconds, 1),
                       "extra_peak_mb": round((peak - base) / 1024, 1),
                       "held_mb": round(sum(local(p).numel() * 4 for p in trainer.parts[0].parameters()) / 2**20, 1),
                       "params_m": round(sum(p.numel() for p in decoder.unets[number - 1].parameters()) / 1e6, 2)}, f)
    if workers > 1:
        dist.destroy_process_group()


def main() -> None:
    rows = []
    for name, (workers, *_rest) in CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "result.json")
            mp.spawn(run_case, args=(name, os.path.join(folder, "rendezvous"), out), nprocs=workers)
            with open(out) as f:
                rows.append(json.load(f))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'case':40s} {'step s':>8s} {'samples/s':>10s} {'extra peak MB':>14s} {'held MB':>8s}", file=sys.stderr)
    for row in rows:
        print(f"{row['case']:40s} {row['step_s']:8.3f} {row['samples_per_s']:10.1f} {row['extra_peak_mb']:14.1f} "
              f"{row['held_mb']:8.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
