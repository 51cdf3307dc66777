"""Sample a run's latest prior and decoder checkpoints, as the run's `sampling` says; one mode per call.

    dalle2 sample --root RUN --prompt "a red circle on the left" [--prompt ...] [--prompts-file F]
                  [--negative-prompt TEXT]                             text to image
    dalle2 sample --root RUN --vary IMAGE [--vary ...]                 variations of images
    dalle2 sample --root RUN --interpolate A B [--frames 8]            A, B: prompts or image files
    dalle2 sample --root RUN --inpaint IMAGE --mask MASK --prompt P    redraw where the mask is white
    dalle2 sample --root RUN --upscale IMAGE [--upscale ...]           through the decoder's upsamplers
  and for every mode: [--n 4] [--seed 0] [--out grid.png] [--out-npy images.npy] [--device cuda]
                  [--prior-cond-scale G] [--decoder-cond-scale G] [--cond-scale G (both)] [--candidates K]
                  [--sampler ddim|ddpm|dpmpp] [--steps N]

Every setting not given is the run's (its evaluations and samples.png used the same); the log and `<out>.json`
say which were used. The grid has a labelled row per prompt or image (one row for an interpolation).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

MAX_PROMPTS_CHARS = 1_000_000  # a --prompts-file: thousands of prompts, not a whole disk


def generate(root: str, prompts: list[str], n: int = 4, settings: Optional[dict] = None, seed: int = 0,
             device: str = "cpu"):
    """Images [len(prompts) * n, 3, H, W] in [0, 1], prompt-major, on the CPU, and the sampling settings used: the
    run's `sampling`, with `settings` (its fields) overriding."""
    from .generation import RunModel

    model = RunModel(root, device, seed)
    used = model.settings(settings)
    return model.text_to_image(prompts, n, used, seed), used


def grid_png(images, labels: list[str]) -> bytes:
    """PNG bytes of row-major images [B, 3, H, W] in [0, 1]: one row per label, the label on its left."""
    from dalle2.text_to_image import to_uint8

    from .grids import labelled_grid

    return labelled_grid(to_uint8(images), labels, columns=max(1, len(images) // len(labels)))


def prompts_of(args) -> list[str]:
    """The prompts of --prompt and --prompts-file (one per line, blank lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        import fsspec

        with fsspec.open(args.prompts_file, "rt", encoding="utf-8") as f:
            text = f.read(MAX_PROMPTS_CHARS + 1)
        if len(text) > MAX_PROMPTS_CHARS:
            raise SystemExit(f"dalle2 sample: {args.prompts_file} is over {MAX_PROMPTS_CHARS} characters")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"dalle2 sample: {args.prompts_file} holds no prompt")
    return prompts


def endpoint_of(source: str):
    """An --interpolate endpoint: an image file's pixels when `source` names one (a path or a URL), else the prompt."""
    import re

    from .generation import read_image

    return read_image(source) if os.path.isfile(source) or re.fullmatch(r"[a-z0-9]+://\S+", source) else source


def sample(model, args, used) -> tuple:
    """(images [B, 3, H, W] in [0, 1], the grid's row labels) of the mode the arguments name."""
    from .generation import keep_mask_of, read_image

    if args.vary:
        images = [read_image(path) for path in args.vary]
        return model.variations(images, args.n, used, args.seed), list(args.vary)
    if args.interpolate:
        start, end = (endpoint_of(s) for s in args.interpolate)
        return model.interpolate(start, end, args.frames, used, args.seed), [" -> ".join(args.interpolate)]
    if args.upscale:
        images = [read_image(path) for path in args.upscale]
        return model.upscale(images, used, args.seed), list(args.upscale)
    prompts = prompts_of(args)
    if args.inpaint:
        if not args.mask or len(prompts) != 1:
            raise SystemExit("dalle2 sample: --inpaint needs --mask MASK (white: redraw) and one --prompt")
        image = stack([read_image(args.inpaint)], model.image_size)[0]
        keep = keep_mask_of(read_image(args.mask, mode="L"), tuple(image.shape[1:]))
        return model.inpaint(image, keep, prompts[0], args.n, used, args.seed), [prompts[0]]
    if not prompts:
        raise SystemExit("dalle2 sample: give --prompt (or --prompts-file), --vary, --interpolate, --inpaint or --upscale")
    return model.text_to_image(prompts, args.n, used, args.seed, args.negative_prompt), prompts


def stack(images: list, size: int):
    """Images [3, h, w] of any sizes as one batch [B, 3, size, size] (resized, as the decoder's own inputs are)."""
    import torch

    from dalle2.decoder import resize_image

    return torch.cat([resize_image(image[None], size) for image in images])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dalle2 sample", description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    modes = p.add_argument_group("modes (text to image unless one of the others is given)")
    modes.add_argument("--prompt", action="append", help="repeat for several prompts")
    modes.add_argument("--prompts-file", help="a text file of prompts, one per line")
    modes.add_argument("--negative-prompt", help="what the prior's guidance moves away from (needs its guidance > 1)")
    modes.add_argument("--vary", action="append", metavar="IMAGE", help="variations of an image file (repeatable)")
    modes.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="from A to B: prompts or image files")
    modes.add_argument("--frames", type=int, default=8, help="interpolation images, the endpoints included")
    modes.add_argument("--inpaint", metavar="IMAGE", help="redraw part of an image for --prompt")
    modes.add_argument("--mask", metavar="MASK", help="--inpaint's mask: white is redrawn, black kept")
    modes.add_argument("--upscale", action="append", metavar="IMAGE", help="an image through the upsamplers")
    p.add_argument("--n", type=int, default=4, help="images per prompt or image")
    p.add_argument("--cond-scale", type=float, default=None, help="guidance of both models (default: the run's)")
    p.add_argument("--prior-cond-scale", type=float, default=None, help="the prior's guidance")
    p.add_argument("--decoder-cond-scale", type=float, default=None, help="the decoder's guidance")
    p.add_argument("--candidates", type=int, default=None, help="image embeddings drawn per prompt, the closest kept")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "dpmpp"], default=None, help="every model's sampler")
    p.add_argument("--steps", type=int, default=None, help="every model's sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to sample: cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--out-npy", default=None)
    return p


def main(argv: Optional[list[str]] = None) -> np.ndarray:
    """Write a labelled grid PNG, `<out>.json` (what was sampled, how) and optionally a uint8 array (N, H, W, 3)."""
    import json

    from dalle2.text_to_image import to_uint8
    from pipeline.execution.console import setup_logging
    from pipeline.run.storage import write_atomic, write_npy

    from .generation import ImageError, RunModel

    args = parser().parse_args(argv)
    given_modes = [m for m in ("vary", "interpolate", "inpaint", "upscale") if getattr(args, m)]
    if len(given_modes) > 1:
        raise SystemExit(f"dalle2 sample: one mode at a time, got {', '.join('--' + m for m in given_modes)}")
    if args.n < 1 or args.frames < 2:
        raise SystemExit("dalle2 sample: --n must be at least 1 and --frames at least 2")
    prompted = args.prompt or args.prompts_file
    if given_modes[:1] in (["vary"], ["interpolate"], ["upscale"]) and prompted:
        raise SystemExit(f"dalle2 sample: --{given_modes[0]} takes no --prompt or --prompts-file")
    if args.negative_prompt and given_modes:
        raise SystemExit("dalle2 sample: --negative-prompt guides text to image only")
    setup_logging()
    given = {"prior_cond_scale": args.prior_cond_scale if args.prior_cond_scale is not None else args.cond_scale,
             "decoder_cond_scale": args.decoder_cond_scale if args.decoder_cond_scale is not None else args.cond_scale,
             "candidates": args.candidates, "sampler": args.sampler, "steps": args.steps}
    model = RunModel(args.root, args.device, args.seed)
    used = model.settings({k: v for k, v in given.items() if v is not None})
    try:
        images, labels = sample(model, args, used)
    except (ImageError, ValueError) as error:
        raise SystemExit(f"dalle2 sample: {error}") from None
    write_atomic(args.out, grid_png(images, labels))
    array = to_uint8(images)
    if args.out_npy:
        write_npy(args.out_npy, array)
    meta = {"mode": (given_modes or ["text"])[0], "rows": labels, "n": args.n, "seed": args.seed,
            "negative_prompt": args.negative_prompt, "sampling": used.model_dump(mode="json")}
    if not given_modes:
        meta["prompts"] = labels
    write_atomic(os.path.splitext(args.out)[0] + ".json", json.dumps(meta, indent=1).encode())
    log.info("wrote %s (%d images), sampled with %s", args.out, len(array), used.described())
    return array


if __name__ == "__main__":
    main()
