"""Training and sampling throughput of the prior and the decoder, one JSON line per case.

Each case runs in its own process so its peak RSS is its own. Usage:
    python bench/train_step.py              # every case
    python bench/train_step.py --case NAME  # one case (what the parent process calls)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Callable

import torch

THREADS = 2
CASES: dict[str, Callable[[], dict]] = {}


def case(fn: Callable[[], dict]) -> Callable[[], dict]:
    CASES[fn.__name__] = fn
    return fn


def timed(step: Callable[[], None], warmup: int, iters: int) -> float:
    """Seconds per call of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def prior_training(dim: int, depth: int, heads: int, dim_head: int, batch: int) -> dict:
    from dalle2 import DiffusionPrior, DiffusionPriorNetwork, PriorTrainer

    net = DiffusionPriorNetwork(dim=dim, depth=depth, heads=heads, dim_head=dim_head, embed_dim=256)
    trainer = PriorTrainer(DiffusionPrior(net=net, timesteps=100))
    data = {"text_embed": torch.randn(batch, 256), "image_embed": torch.randn(batch, 256)}
    seconds = timed(lambda: trainer.train_step(data), warmup=3, iters=20)
    return {"samples_per_s": batch / seconds, "params": sum(p.numel() for p in net.parameters()), "batch": batch}


@case
def prior_train_dim256_depth4() -> dict:
    return prior_training(dim=256, depth=4, heads=8, dim_head=32, batch=64)


@case
def prior_train_dim512_depth6() -> dict:
    return prior_training(dim=512, depth=6, heads=8, dim_head=64, batch=32)


@case
def prior_sample_ddim64() -> dict:
    from dalle2 import DiffusionPrior, DiffusionPriorNetwork

    net = DiffusionPriorNetwork(dim=256, depth=4, heads=8, dim_head=32, embed_dim=256)
    prior = DiffusionPrior(net=net, timesteps=100).eval()
    text_embed = torch.randn(64, 256)
    seconds = timed(lambda: prior.sample(text_embed=text_embed, sample_timesteps=64), warmup=1, iters=3)
    # each text draws num_samples_per_batch candidates; samples/s counts the returned embeds
    return {"samples_per_s": 64 / seconds, "params": sum(p.numel() for p in net.parameters()), "batch": 64}


def decoder_training(unet_kwargs: dict, image_sizes: tuple, unet_number: int, batch: int) -> dict:
    from dalle2 import Decoder, DecoderTrainer, Unet

    # learned variance on unet 1 only, as a config-built decoder has it by default
    unets = [Unet(image_embed_dim=256, lowres_cond=i > 0, learned_variance=i == 0, **kw) for i, kw in enumerate(unet_kwargs)]
    decoder = Decoder(unet=unets, image_sizes=image_sizes, timesteps=100)
    trainer = DecoderTrainer(decoder, unet_numbers=[unet_number])
    size = image_sizes[-1]
    data = {"image": torch.rand(batch, 3, size, size), "image_embed": torch.randn(batch, 256)}
    seconds = timed(lambda: trainer.train_step(data, unet_number=unet_number), warmup=2, iters=8)
    params = sum(p.numel() for p in unets[unet_number - 1].parameters())
    return {"samples_per_s": batch / seconds, "params": params, "batch": batch}


BASE_UNET = dict(dim=32, cond_dim=64, dim_mults=(1, 2, 4))


@case
def decoder_train_unet1_64px() -> dict:
    return decoder_training([BASE_UNET], (64,), unet_number=1, batch=8)


@case
def decoder_train_unet2_64_to_128px() -> dict:
    upsampler = dict(dim=16, dim_mults=(1, 2, 4, 8))
    return decoder_training([BASE_UNET, upsampler], (64, 128), unet_number=2, batch=8)


@case
def decoder_sample_64px_ddim50() -> dict:
    from dalle2 import Decoder, Unet

    unet = Unet(image_embed_dim=256, learned_variance=True, **BASE_UNET)
    decoder = Decoder(unet=unet, image_sizes=64, timesteps=100, sample_timesteps=50).eval()
    embeds = torch.randn(4, 256)
    seconds = timed(lambda: decoder.sample(image_embed=embeds, cond_scale=1.0), warmup=1, iters=2)
    return {"samples_per_s": 4 / seconds, "params": sum(p.numel() for p in unet.parameters()), "batch": 4}


def run_case(name: str) -> dict:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    result = CASES[name]()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": name, **{k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()},
            "peak_rss_mb": round(peak_rss_mb, 1), "threads": THREADS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return
    for name in CASES:
        subprocess.run([sys.executable, __file__, "--case", name], check=True)


if __name__ == "__main__":
    main()
