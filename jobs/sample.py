"""Generate images from a run's latest prior and decoder checkpoints, sampled as the run's `sampling` says.

    dalle2 sample --root RUN --prompt "a red circle on the left" [--prompt ...] [--n 4] [--out grid.png]
                  [--out-npy images.npy] [--device cuda]
                  [--prior-cond-scale G] [--decoder-cond-scale G] [--cond-scale G (both)] [--candidates K]
                  [--sampler ddim|ddpm|dpmpp] [--steps N]

Every setting not given is the run's (its evaluations and samples.png used the same); the log and `<out>.json`
say which were used.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional

import numpy as np


def generate(root: str, prompts: list[str], n: int = 4, settings: Optional[dict] = None, seed: int = 0,
             device: str = "cpu"):
    """Images [len(prompts) * n, 3, H, W] in [0, 1], prompt-major, on the CPU, and the sampling settings used: the
    run's `sampling`, with `settings` (its fields) overriding."""
    import torch

    from .checkpoints import load_dalle2
    from .run_config import load_run_config

    run = load_run_config(root)
    used = run.sampling.model_validate({**run.sampling.model_dump(), **(settings or {})})
    torch.manual_seed(seed)  # a run without CLIP weights of its own builds one (its imported models): the same one
    dalle2 = load_dalle2(run).to(device)
    texts = [p for p in prompts for _ in range(n)]
    images = dalle2(texts, prior_cond_scale=used.prior_cond_scale, decoder_cond_scale=used.decoder_cond_scale,
                    prior_num_samples=used.candidates, sample_timesteps=used.steps, sampler=used.sampler,
                    generator=torch.Generator(device).manual_seed(seed))
    return images.cpu(), used


def grid_png(images, prompts: list[str]) -> bytes:
    """PNG bytes of prompt-major images [B, 3, H, W] in [0, 1]: one row per prompt, the prompt on its left."""
    from dalle2.text_to_image import to_uint8

    from .grids import labelled_grid

    return labelled_grid(to_uint8(images), prompts, columns=max(1, len(images) // len(prompts)))


def main(argv: Optional[list[str]] = None) -> np.ndarray:
    """Write a grid PNG (one row per prompt) and optionally a uint8 array (N, H, W, 3)."""
    from dalle2.text_to_image import to_uint8
    from pipeline.run.storage import write_atomic, write_npy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument("--cond-scale", type=float, default=None, help="guidance of both models (default: the run's)")
    parser.add_argument("--prior-cond-scale", type=float, default=None, help="the prior's guidance")
    parser.add_argument("--decoder-cond-scale", type=float, default=None, help="the decoder's guidance")
    parser.add_argument("--candidates", type=int, default=None, help="image embeddings drawn per prompt, the "
                        "closest to it kept")
    parser.add_argument("--sampler", choices=["ddim", "ddpm", "dpmpp"], default=None, help="every model's sampler")
    parser.add_argument("--steps", type=int, default=None, help="every model's sampling steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to sample: cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--out-npy", default=None)
    args = parser.parse_args(argv)
    from pipeline.execution.console import setup_logging

    setup_logging()
    given = {"prior_cond_scale": args.prior_cond_scale if args.prior_cond_scale is not None else args.cond_scale,
             "decoder_cond_scale": args.decoder_cond_scale if args.decoder_cond_scale is not None else args.cond_scale,
             "candidates": args.candidates, "sampler": args.sampler, "steps": args.steps}
    images, used = generate(args.root, args.prompt, args.n, {k: v for k, v in given.items() if v is not None},
                            args.seed, args.device)
    write_atomic(args.out, grid_png(images, args.prompt))
    array = to_uint8(images)
    if args.out_npy:
        write_npy(args.out_npy, array)
    import json
    import os

    meta = {"prompts": args.prompt, "n": args.n, "seed": args.seed, "sampling": used.model_dump(mode="json")}
    write_atomic(os.path.splitext(args.out)[0] + ".json", json.dumps(meta, indent=1).encode())
    logging.getLogger(__name__).info("wrote %s (%d images), sampled with %s", args.out, len(array), used.described())
    return array


if __name__ == "__main__":
    main()
