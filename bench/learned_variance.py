"""Learned variance on or off, and its weight, measured on the demo: the decoder trained again from one finished demo
run (same data, CLIP and prior) for each setting and seed, then sampled at equal steps with DDIM and with strided
DDPM, scored by the demo's prompt match and R-precision. Prints a table of means and spreads over seeds.

    .venv/bin/dalle2 demo --root runs/demo            # once, if there is no finished demo run
    .venv/bin/python bench/learned_variance.py --root runs/demo --seeds 0 1 2

Settings: `off` (no learned variance), `dalle2` (on, vb_loss_weight 0.001 on the per-step term, as DALLE2-pytorch
weighs it) and `iddpm` (on, 0.001 x timesteps: improved DDPM's lambda on the sum over all T terms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

SETTINGS = {"off": {"learned_variance": False}, "dalle2": {"learned_variance": True, "vb_loss_weight": 0.001},
            "iddpm": {"learned_variance": True, "vb_loss_weight": None}}  # None: 0.001 x timesteps
SAMPLERS = ("ddim", "ddpm")


def variant_root(run: str, folder: str) -> str:
    """A run root that shares `run`'s data, CLIP and prior (links) and has no decoder of its own yet."""
    os.makedirs(os.path.join(folder, "train"))
    for name in os.listdir(run):
        if name in ("train", "config.yaml", "ledger"):
            continue
        os.symlink(os.path.join(run, name), os.path.join(folder, name))
    shutil.copytree(os.path.join(run, "ledger"), os.path.join(folder, "ledger"))
    for name in os.listdir(os.path.join(run, "train")):
        if not name.startswith("decoder"):
            os.symlink(os.path.join(run, "train", name), os.path.join(folder, "train", name))
    return folder


def train(run: str, folder: str, setting: str, seed: int) -> float:
    """Train the demo's decoder with `setting` into a variant of `run`; returns seconds."""
    from dalle2.configs import load_registered

    with open(os.path.join(run, "config.yaml")) as f:
        config = yaml.safe_load(f)
    job = config["train_decoder"]
    decoder = load_registered("decoder", job["decoder"]) if isinstance(job["decoder"], str) else dict(job["decoder"])
    extra = dict(SETTINGS[setting])
    if extra.get("vb_loss_weight", 0) is None:
        extra["vb_loss_weight"] = 0.001 * decoder["diffusion"]["timesteps"]
    decoder.update(extra)
    config.update(root=folder)
    config["train_decoder"] = {**job, "decoder": decoder, "seed": seed}
    path = os.path.join(folder, "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    started = time.monotonic()
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "dalle2"), "train-decoder", "--config", path],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"train-decoder failed for {setting} seed {seed}:\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def score(folder: str, sampler: str, samples_per_prompt: int, seed: int) -> dict:
    """Prompt match (seen and withheld prompts) and R-precision of the variant's samples with `sampler`."""
    import torch

    from dalle2.text_to_image import to_uint8
    from jobs.checkpoints import load_dalle2
    from jobs.demo import prompt_match
    from jobs.shapes import PROMPTS
    from jobs.demo_report import agreement
    from jobs.run_config import load_run_config

    config = load_run_config(folder)
    model = load_dalle2(config)
    decoder_config = model.decoder.config
    for index in range(len(decoder_config.unets)):
        decoder_config.diffusion_for(index).sampler = sampler
    prompts = [p for p in PROMPTS if p not in config.demo.withhold] + list(config.demo.withhold)
    texts = [p for p in prompts for _ in range(samples_per_prompt)]
    with torch.no_grad():
        images = model(texts, cond_scale=config.train_decoder.cond_scale,
                       generator=torch.Generator().manual_seed(seed)).cpu()
    match = prompt_match(to_uint8(images), prompts, samples_per_prompt)
    return {**match, "r_precision": agreement(config, images, prompts, samples_per_prompt)["r_precision"]}


def load_results(path: str | None) -> list[dict]:
    """Rows a previous run appended to `path` (one JSON object a line); none when there is no file."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/demo", help="a finished demo run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--out", default=None,
                        help="append each result here as a JSON line; a re-run with the same file skips what it holds")
    args = parser.parse_args(argv)
    run = os.path.abspath(args.root)
    if not os.path.exists(os.path.join(run, "report.json")):
        raise SystemExit(f"{run} is not a finished demo run: `dalle2 demo --root {args.root}` first")
    results = load_results(args.out)
    with tempfile.TemporaryDirectory(prefix="lv-bench-") as scratch:
        for setting in args.settings:
            for seed in args.seeds:
                missing = [s for s in SAMPLERS if not any(r["setting"] == setting and r["seed"] == seed
                                                          and r["sampler"] == s for r in results)]
                if not missing:
                    continue
                folder = variant_root(run, os.path.join(scratch, f"{setting}-{seed}"))
                seconds = train(run, folder, setting, seed)
                for sampler in missing:
                    row = {"setting": setting, "seed": seed, "sampler": sampler, "train_s": round(seconds, 1),
                           **score(folder, sampler, args.samples_per_prompt, seed)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print(f"\n{'setting':8s} {'sampler':8s} {'all_match':>16s} {'shape':>16s} {'r_precision':>16s}   (mean ± sd over "
          f"{len(args.seeds)} seeds, {args.samples_per_prompt} samples a prompt, 20 steps, guidance as the demo)")
    for setting in args.settings:
        for sampler in SAMPLERS:
            rows = [r for r in results
                    if r["setting"] == setting and r["sampler"] == sampler and r["seed"] in args.seeds]
            if not rows:
                continue
            cells = []
            for field in ("all_match", "shape_match", "r_precision"):
                values = [r[field] for r in rows]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
            print(f"{setting:8s} {sampler:8s} " + " ".join(f"{c:>16s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
