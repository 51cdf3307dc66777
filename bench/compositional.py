"""The compositional benchmark: can the model draw colour-shape-position triples it never saw?

    python bench/compositional.py --out bench-runs/compositional [--sets 5] [--variants baseline text]
                                  [--levers demo g1 ...] [--per-unseen 8] [--per-seen 2]

The grid is 5 colours x 3 shapes x 3 positions at 32 px (45 triples). Each withheld set takes 5 triples out, drawn
with its own fixed seed, so every colour, shape and position is still seen in training; only those combinations are
new. For each training variant (config levers: decoder width, text-conditioned prior and decoder, NegCLIP hard
negatives) and each set, `dalle2 demo` trains a run from scratch at the demo's budget (skipped when that run already
finished), then every sampling lever (guidance of prior and decoder, prior candidates) samples the same trained
models. Samples are read by the project's shape reader (jobs/shapes.describe), whose accuracy on real images of the
grid is reported first. Each run also reports its CLIP's own compositional retrieval on real images: the right triple
among all 45 captions, and the right caption against its words swapped.

Results go to <out>/results.jsonl (one line per variant, set and lever; an existing line is not measured again) and
a table of means ± standard deviation over the sets to stderr. Hours on 2 CPU cores: about 6 minutes a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

GRID_COLORS = ("red", "green", "blue", "yellow", "purple")
WITHHELD_PER_SET = 5
ATTRIBUTES = ("color", "shape", "position", "all")

# training levers: `dalle2 demo --set` overrides on top of the demo's config
WIDE = ("train_decoder.decoder={base: tiny, unets: [{dim: 32, dim_mults: [1, 2, 4], num_resnet_blocks: 1, "
        "image_embed_dim: 64, layer_attns: [false, false, true], layer_cross_attns: [false, false, true]}]}")
TINY_PRIOR, TEXT_PRIOR = "train_prior.prior=tiny", "train_prior.prior=tiny-text"
TEXT_DECODER = "train_decoder.decoder=tiny-text"
# tiny-text as first tried: the text tokens dropped for half the rows (DALL-E 2's share), not 10%
TEXT_DECODER_HALF = "train_decoder.decoder={base: tiny-text, text_cond_drop_prob: 0.5}"
# name: (--set overrides, a variant it may derive from, the training jobs it retrains there). Where the other
# variant's run of the same set has finished, the run is a copy of it with only the models this variant changes
# trained anew, from scratch: every stage upstream of them is what a run from scratch would compute (CLIP does not
# depend on the prior or the decoder, nor the decoder on the prior). Otherwise the variant trains from scratch.
VARIANTS = {
    "baseline": ([TINY_PRIOR, "train_decoder.decoder=tiny"], None, ()),  # the demo before this benchmark
    "wide": ([TINY_PRIOR, WIDE], "baseline", ("decoder",)),  # capacity: 32 / 64 wide at 32 / 16 px (tiny: 16 / 48)
    # wide, and the decoder cross-attends to the caption's per-token text encodings, dropped for half of its rows
    "text-decoder": ([TINY_PRIOR, TEXT_DECODER_HALF], "text", ("prior",)),
    "text": ([TEXT_PRIOR, TEXT_DECODER_HALF], "text-decoder", ("prior",)),  # and the prior reads them too
    # the demo now: the decoder's text tokens dropped for 10% of its rows (tiny-text), so it leans on the words
    "text-decoder-t01": ([TINY_PRIOR, TEXT_DECODER], "text-decoder", ("decoder",)),
    "text-decoder-t01+negclip": ([TINY_PRIOR, TEXT_DECODER, "train_clip.hard_negatives=true"], None, ()),  # NegCLIP
}
# sampling levers: the run's `sampling` fields, on the same trained models ("demo": the demo's own settings)
LEVERS = {
    "demo": {},
    "g1": {"prior_cond_scale": 1.0, "decoder_cond_scale": 1.0},
    "prior1": {"prior_cond_scale": 1.0},
    "decoder1": {"decoder_cond_scale": 1.0},
    "g5": {"prior_cond_scale": 5.0, "decoder_cond_scale": 5.0},
    "decoder5": {"decoder_cond_scale": 5.0},
    "cand1": {"candidates": 1},
    "cand8": {"candidates": 8},
}


def withheld_sets(count: int) -> list[list[str]]:
    """`count` sets of WITHHELD_PER_SET captions of the grid, set k drawn with seed k."""
    from jobs.shapes import all_specs

    captions = [spec.caption for spec in all_specs(GRID_COLORS)]
    return [sorted(random.Random(k).sample(captions, WITHHELD_PER_SET)) for k in range(count)]


def train(out: str, variant: str, k: int, withheld: list[str]) -> str:
    """The run of `variant` on withheld set k, trained by `dalle2 demo` unless it finished before; its root."""
    root = os.path.join(out, variant, f"set{k}")
    if os.path.exists(os.path.join(root, "report.json")):
        return root
    variant_overrides, parent, retrain = VARIANTS[variant]
    parent_root = os.path.join(out, str(parent), f"set{k}")
    if parent is not None and os.path.exists(os.path.join(parent_root, "report.json")):
        derive(parent_root, root, retrain)
    overrides = [f"demo.colors=[{','.join(GRID_COLORS)}]", f"demo.withhold=[{','.join(withheld)}]", *variant_overrides]
    command = [sys.executable, "-m", "jobs.cli", "demo", "--root", root] + [a for o in overrides for a in ("--set", o)]
    started = time.time()
    with open(os.path.join(out, f"{variant}-set{k}.log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"trained {variant} set {k} in {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    return root


def derive(parent: str, root: str, retrain: tuple[str, ...]) -> None:
    """`root` as a copy of the finished run `parent` without the models of `retrain`, its index and its samples, so
    that `dalle2 demo` there skips every finished stage and trains those models anew."""
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(parent, root)
    # the run's records name its root (the CLIP checkpoint embed used, ledgers): make them name the copy
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith((".json", ".jsonl", ".yaml", ".md")) and os.path.getsize(path) < 50_000_000:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
                if parent in text:
                    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
                        f.write(text.replace(parent, root))
    for job in retrain:
        shutil.rmtree(os.path.join(root, "train", job))
        os.remove(os.path.join(root, "train", f"{job}_summary.json"))
    shutil.rmtree(os.path.join(root, "index"), ignore_errors=True)
    for name in ("report.json", "report.md", "report.html", "samples.png", "samples.npy"):
        if os.path.exists(os.path.join(root, name)):
            os.remove(os.path.join(root, name))


def real_grid(per_triple: int = 8, size: int = 32):
    """Real images of every grid triple as the data set draws them: ({caption: uint8 [n, H, W, 3]})."""
    import numpy as np

    from jobs.shapes import all_specs, draw

    rng = random.Random(12345)
    return {spec.caption: np.stack([np.asarray(draw(spec, size=size, jitter=0.05, rng=rng)) for _ in range(per_triple)])
            for spec in all_specs(GRID_COLORS)}


def judged(arrays, prompts: list[str], per_prompt: int) -> dict:
    """Fractions of samples whose colour, shape, position and all three the shape reader finds as prompted."""
    from jobs.demo import prompt_match

    match = prompt_match(arrays, prompts, per_prompt)
    return {name: match[f"{name}_match"] for name in ATTRIBUTES}


def clip_retrieval(root: str, real: dict, withheld: list[str]) -> dict:
    """The run's CLIP on real images: top-1 among the grid's 45 captions, and own caption over each of its word
    swaps, on seen and unseen triples."""
    import torch

    from dalle2.clip_trainer import caption_swaps
    from jobs.evaluation import scoring_clip
    from jobs.run_config import load_run_config

    clip = scoring_clip(load_run_config(root))
    captions = list(real)
    with torch.no_grad():
        texts = torch.nn.functional.normalize(clip.embed_text(captions).text_embed.float(), dim=-1)
        out = {}
        for split, chosen in (("seen", [c for c in captions if c not in withheld]), ("unseen", withheld)):
            top1, swaps = [], []
            for caption in chosen:
                images = torch.from_numpy(real[caption]).permute(0, 3, 1, 2).float() / 255
                features = torch.nn.functional.normalize(clip.embed_image(images).float(), dim=-1)
                top1 += (features @ texts.T).argmax(dim=1).eq(captions.index(caption)).tolist()
                negative = clip.embed_text(caption_swaps(caption)).text_embed.float()
                negative = torch.nn.functional.normalize(negative, dim=-1)
                own = features @ texts[captions.index(caption)]
                swaps += (own[:, None] > features @ negative.T).all(dim=1).tolist()
            out[f"clip_top1_{split}"] = sum(top1) / len(top1)
            out[f"clip_swap_{split}"] = sum(swaps) / len(swaps)
    return out


def score(root: str, withheld: list[str], levers: list[str], per_seen: int, per_unseen: int) -> dict:
    """{lever: {seen_<attr>, unseen_<attr>}} for samples of the run at `root` under each sampling lever."""
    from dalle2.text_to_image import to_uint8
    from jobs.generation import RunModel
    from jobs.shapes import all_specs

    seen = [spec.caption for spec in all_specs(GRID_COLORS) if spec.caption not in withheld]
    model = RunModel(root, "cpu", 0)
    out = {}
    for lever in levers:
        used = model.settings(LEVERS[lever])
        started = time.perf_counter()
        seen_images = to_uint8(model.text_to_image(seen, per_seen, used, 0))
        unseen_images = to_uint8(model.text_to_image(withheld, per_unseen, used, 1))
        row = {f"seen_{k}": v for k, v in judged(seen_images, seen, per_seen).items()}
        row.update({f"unseen_{k}": v for k, v in judged(unseen_images, withheld, per_unseen).items()})
        row["sampling"] = used.described()
        row["images_per_s"] = (len(seen_images) + len(unseen_images)) / (time.perf_counter() - started)
        out[lever] = row
    return out


def spread(values: list[float]) -> str:
    """mean ± standard deviation over the sets."""
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def summarise(rows: list[dict]) -> str:
    """A markdown table: one row per variant and lever, each attribute's mean ± sd over the sets."""
    head = ["variant", "lever", "sets"] + [f"seen {a}" for a in ATTRIBUTES] + [f"unseen {a}" for a in ATTRIBUTES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def order(key: tuple[str, str]) -> tuple[int, int]:
        return list(VARIANTS).index(key[0]), list(LEVERS).index(key[1])

    keys = sorted({(r["variant"], r["lever"]) for r in rows if r["variant"] in VARIANTS}, key=order)
    for variant, lever in keys:
        mine = [r for r in rows if r["variant"] == variant and r["lever"] == lever]
        cells = [spread([r[f"{split}_{a}"] for r in mine]) for split in ("seen", "unseen") for a in ATTRIBUTES]
        lines.append("| " + " | ".join([variant, lever, str(len(mine))] + cells) + " |")
    clip_rows = {}
    for r in rows:
        if "clip_top1_seen" in r:
            clip_rows.setdefault(r["variant"], {})[r["set"]] = r
    if clip_rows:
        names = ("clip_top1_seen", "clip_top1_unseen", "clip_swap_seen", "clip_swap_unseen")
        lines += ["", "| variant | CLIP top-1 seen | top-1 unseen | own caption over its swaps, seen | unseen |",
                  "|---|---|---|---|---|"]
        for variant, by_set in clip_rows.items():
            lines.append("| " + " | ".join([variant] + [spread([r[n] for r in by_set.values()]) for n in names]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-runs/compositional")
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--only", type=int, nargs="+", default=None, help="run these of the sets alone")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--per-seen", type=int, default=2, help="samples of each of the 40 seen triples")
    parser.add_argument("--per-unseen", type=int, default=8, help="samples of each withheld triple")
    args = parser.parse_args()
    if min(args.sets, args.per_seen, args.per_unseen) < 1:
        parser.error("--sets, --per-seen and --per-unseen take 1 or more (2 sets or more give a spread)")
    if args.only is not None and not all(0 <= k < args.sets for k in args.only):
        parser.error(f"--only takes set numbers 0 to {args.sets - 1} (--sets {args.sets})")
    # absolute: a run's records hold absolute paths, which derive() rewrites by the root's prefix
    args.out = os.path.abspath(args.out)

    import torch

    from jobs.shapes import describe, spec_of

    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    real = real_grid()
    read = [describe(a) == (spec_of(c).color, spec_of(c).shape, spec_of(c).position) for c, arrays in real.items()
            for a in arrays]
    reader = {"shape_reader_accuracy": sum(read) / len(read), "real_images": len(read)}
    print(json.dumps(reader), file=sys.stderr, flush=True)

    results_path = os.path.join(args.out, "results.jsonl")
    rows = []
    if os.path.exists(results_path):
        with open(results_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    done = {(r["variant"], r["set"], r["lever"]) for r in rows}
    sets = withheld_sets(args.sets)
    for variant in args.variants:
        for k, withheld in enumerate(sets):
            if args.only is not None and k not in args.only:
                continue
            todo = [lever for lever in args.levers if (variant, k, lever) not in done]
            if not todo:
                continue
            root = train(args.out, variant, k, withheld)
            retrieval = clip_retrieval(root, real, withheld)
            for lever, row in score(root, withheld, todo, args.per_seen, args.per_unseen).items():
                row = {"variant": variant, "set": k, "lever": lever, "withheld": withheld, **retrieval, **row}
                rows.append(row)
                with open(results_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()
                                  if k2 != "withheld"}), file=sys.stderr, flush=True)
    shown = [r for r in rows if r["variant"] in args.variants and r["lever"] in args.levers and r["set"] < args.sets]
    print(f"\nshape reader on {reader['real_images']} real images of the grid: {reader['shape_reader_accuracy']:.3f} "
          "all three right\n", file=sys.stderr)
    print(summarise(shown), file=sys.stderr)


if __name__ == "__main__":
    main()
