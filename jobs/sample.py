"""Generate images from a run's latest prior and decoder checkpoints.

    dalle2 sample --root RUN --prompt "a red circle on the left" [--prompt ...] [--n 4] [--cond-scale 3]
                  [--out grid.png] [--out-npy images.npy] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional

import numpy as np


def generate(root: str, prompts: list[str], n: int = 4, cond_scale: float = 1.0, seed: int = 0, device: str = "cpu"):
    """Images [len(prompts) * n, 3, H, W] in [0, 1], prompt-major, on the CPU."""
    import torch

    from .checkpoints import load_dalle2
    from .run_config import load_run_config

    dalle2 = load_dalle2(load_run_config(root)).to(device)
    texts = [p for p in prompts for _ in range(n)]
    return dalle2(texts, cond_scale=cond_scale, generator=torch.Generator(device).manual_seed(seed)).cpu()


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
    parser.add_argument("--cond-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to sample: cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--out-npy", default=None)
    args = parser.parse_args(argv)
    from pipeline.execution.console import setup_logging

    setup_logging()
    images = generate(args.root, args.prompt, args.n, args.cond_scale, args.seed, args.device)
    write_atomic(args.out, grid_png(images, args.prompt))
    array = to_uint8(images)
    if args.out_npy:
        write_npy(args.out_npy, array)
    logging.getLogger(__name__).info("wrote %s (%d images)", args.out, len(array))
    return array


if __name__ == "__main__":
    main()
