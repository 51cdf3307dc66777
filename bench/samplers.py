"""DDIM vs DPM-Solver++(2M) on a trained demo run, side by side in one run: the demo's prompt match (colour, shape,
position read off the pixels; seen and withheld prompts), R-precision with the run's CLIP, and images per second,
at each step count for every model of the run (prior and decoder alike).

    make demo && python bench/samplers.py --root runs/demo [--steps 10 25 50] [--per-prompt 8]

Guidance is the run's `sampling` (the demo's: 3 for both); each cell draws the same prompts from the same seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/demo")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp"])
    parser.add_argument("--per-prompt", type=int, default=8)
    args = parser.parse_args()

    import torch

    from dalle2.text_to_image import to_uint8
    from jobs.demo import prompt_match
    from jobs.shapes import PROMPTS
    from jobs.demo_report import agreement
    from jobs.run_config import load_run_config
    from jobs.sample import generate

    torch.set_num_threads(2)
    config = load_run_config(args.root)
    withheld = list(config.demo.withhold)
    prompts = [p for p in PROMPTS if p not in withheld]
    rows = []
    for sampler in args.samplers:
        for steps in args.steps:
            started = time.perf_counter()
            images, used = generate(args.root, prompts + withheld, n=args.per_prompt,
                                    settings={"sampler": sampler, "steps": steps})
            seconds = time.perf_counter() - started
            arrays = to_uint8(images)
            split = len(prompts) * args.per_prompt
            seen, unseen = prompt_match(arrays[:split], prompts, args.per_prompt), prompt_match(
                arrays[split:], withheld, args.per_prompt)
            agree = agreement(config, images, prompts + withheld, args.per_prompt)
            rows.append({"sampler": sampler, "steps": steps, "images_per_s": round(len(images) / seconds, 2),
                         "seen_all": round(seen["all_match"], 3), "seen_shape": round(seen["shape_match"], 3),
                         "withheld_all": round(unseen["all_match"], 3), "r_precision": round(agree["r_precision"], 3),
                         "r_precision_se": round(agree["r_precision_se"], 3), "sampling": used.described()})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'sampler':8s} {'steps':>5s} {'images/s':>9s} {'seen all':>9s} {'seen shape':>11s} {'withheld all':>13s} "
          f"{'R-precision':>14s}", file=sys.stderr)
    for row in rows:
        print(f"{row['sampler']:8s} {row['steps']:5d} {row['images_per_s']:9.2f} {row['seen_all']:9.2f} "
              f"{row['seen_shape']:11.2f} {row['withheld_all']:13.2f} {row['r_precision']:8.2f} ± {row['r_precision_se']:.2f}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
