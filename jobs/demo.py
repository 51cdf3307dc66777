"""The demo: the whole pipeline on a built-in data set (or your URL list), on an embedded local Ray.

    dalle2 demo [--root DIR] [--url-list FILE] [--images N] [--set section.field=value ...]

Without --url-list it draws a few thousand images of coloured shapes with compositional captions,
serves them from an HTTP server on 127.0.0.1 so the real download stage runs, then runs every stage
and writes <root>/samples.png (one row per prompt), <root>/samples.npy and <root>/report.{json,md}
(counts, losses, prior metrics, how well samples match their prompts, time per stage).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Optional

log = logging.getLogger("jobs.demo")

PROMPTS = [
    "a red circle on the left", "a blue square on the right", "a green triangle in the center",
    "a yellow square on the left", "a purple circle on the right", "an orange triangle on the left",
]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # thousands of requests: keep the log readable
        pass


def build_site(folder: str, count: int, size: int, seed: int = 0) -> list[tuple[str, str]]:
    """Write the built-in images as PNG files; returns (relative path, caption) pairs."""
    from pipeline.shapes import generate

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rows = []
    for i, (spec, image) in enumerate(generate(count, size=size, seed=seed)):
        image.save(os.path.join(folder, "img", f"{i}.png"))
        rows.append((f"img/{i}.png", spec.caption))
    return rows


def serve(folder: str) -> tuple[ThreadingHTTPServer, str]:
    """A static file server for `folder` on 127.0.0.1 (a free port), in a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def prompt_match(arrays, prompts: list[str], per_prompt: int) -> dict:
    """Fractions of samples ([B, H, W, 3] uint8) whose dominant colour / position / both match their prompt."""
    from pipeline.shapes import describe

    color = position = both = 0
    for i, array in enumerate(arrays):
        prompt = prompts[i // per_prompt]
        seen_color, seen_position = describe(array)
        color += seen_color is not None and seen_color in prompt.split()
        position += seen_position is not None and (seen_position in prompt.split())
        both += seen_color is not None and seen_color in prompt.split() and seen_position in prompt.split()
    n = len(arrays)
    return {"color_match": color / n, "position_match": position / n, "both_match": both / n,
            "chance_color": 1 / 6, "chance_position": 1 / 3}


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the demo; returns its report."""
    from pipeline.storage import write_atomic, write_json, write_npy

    from .config_io import load_config
    from .run_config import RunConfig
    from .sample import generate, grid_png
    from .stages import run_all
    from .status import run_status

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="where the run goes (default: runs/demo)")
    parser.add_argument("--url-list", default=None, help="a csv with url and caption columns instead of the built-in set")
    parser.add_argument("--images", type=int, default=2000, help="size of the built-in data set")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = str(resources.files("jobs") / "configs" / "demo.yaml")
    overrides = list(args.set) + ([f"root={args.root}"] if args.root else [])

    started = time.time()
    server = None
    with tempfile.TemporaryDirectory() as site:
        if args.url_list:
            url_list = args.url_list
        else:
            size = load_config(RunConfig, defaults, overrides).download.image_size
            rows = build_site(site, args.images, size=max(size, 32))
            server, base = serve(site)
            url_list = os.path.join(site, "urls.csv")
            with open(url_list, "w") as f:
                f.write("url,caption\n" + "".join(f"{base}/{path},{caption}\n" for path, caption in rows))
            log.info("serving %d built-in images at %s", len(rows), base)
        overrides.append(f"download.url_list={url_list}")
        config = load_config(RunConfig, defaults, overrides)
        if server is not None:
            forget_stale_inputs(config)
        forwarded = ["--config", defaults] + [x for s in overrides for x in ("--set", s)]
        timings = {}
        stage_started = time.time()
        outcome = run_all(config, forwarded, timings=timings)
        if server is not None:
            server.shutdown()
        stages_seconds = time.time() - stage_started

    per_prompt = 4
    images = generate(config.root, PROMPTS, n=per_prompt, cond_scale=config.train_decoder.cond_scale)
    root = config.root.rstrip("/")
    write_atomic(f"{root}/samples.png", grid_png(images, rows=len(PROMPTS)))
    from dalle2.text_to_image import to_uint8

    arrays = to_uint8(images)
    write_npy(f"{root}/samples.npy", arrays)
    report = {"stages": outcome, "seconds_per_stage": timings, "seconds": round(time.time() - started, 1),
              "pipeline_seconds": round(stages_seconds, 1), "prompts": PROMPTS, "samples_per_prompt": per_prompt,
              "prompt_match": prompt_match(arrays, PROMPTS, per_prompt),
              "text_image_agreement": agreement(config, images, per_prompt), "status": run_status(config.root)}
    write_json(f"{root}/report.json", report)
    write_atomic(f"{root}/report.md", render_report(report).encode())
    log.info("demo finished in %.0fs: %s/samples.png, %s/report.md", report["seconds"], root, root)
    print(json.dumps({k: report[k] for k in ("stages", "seconds_per_stage", "seconds", "prompt_match",
                                             "text_image_agreement")}, default=str))
    return report


def forget_stale_inputs(config) -> None:
    """A demo interrupted mid-download split URLs of a server port that is gone: split again (same order,
    same shard names); finished shards stay finished through their ledger records."""
    from pipeline.layout import RunLayout
    from pipeline.storage import remove

    from .stages import STAGES

    download = next(stage for stage in STAGES if stage.name == "download")
    if not download.complete(config):
        remove(RunLayout(config.root).inputs, recursive=True)


def agreement(config, images, per_prompt: int) -> dict:
    """R-precision, CLIP score (the run's CLIP) and CMMD of the samples, beside the same figures on real images
    of the same prompts (drawn as the built-in set draws them)."""
    import random

    import numpy as np
    import torch

    from dalle2.metrics import text_image_agreement
    from pipeline.shapes import all_specs, draw

    from .checkpoints import run_clip

    by_caption = {spec.caption: spec for spec in all_specs()}
    size, rng = images.shape[-1], random.Random(1)
    real = torch.stack([torch.from_numpy(np.asarray(draw(by_caption[p], size, jitter=0.08, rng=rng), np.float32) / 255)
                        .permute(2, 0, 1) for p in PROMPTS for _ in range(per_prompt)])
    index = torch.arange(len(images)) // per_prompt
    return text_image_agreement(run_clip(config).eval(), images, PROMPTS, index, real_images=real)


def render_report(report: dict) -> str:
    """The report as a short Markdown page."""
    lines = ["# Demo report", "", f"Total time: {report['seconds']} s", "", "| stage | outcome | seconds |", "|---|---|---|"]
    for stage, outcome in report["stages"].items():
        lines.append(f"| {stage} | {outcome} | {report['seconds_per_stage'].get(stage, '')} |")
    lines += ["", "## Data", ""]
    for stage, info in report["status"].items():
        if "rows_in" in info:
            lines.append(f"- {stage}: {info['rows_in']} rows in, {info['written']} written, {info['failed']} failed "
                         f"{info.get('failed_by_reason') or ''}")
    lines += ["", "## Training", ""]
    for stage, info in report["status"].items():
        if "step" in info:
            metrics = {k: round(v, 4) for k, v in info.items() if isinstance(v, float)}
            lines.append(f"- {stage}: step {info['step']}, {metrics}")
    match = report["prompt_match"]
    lines += ["", "## Do the samples match their prompts?", "",
              f"- colour: {match['color_match']:.0%} (chance {match['chance_color']:.0%})",
              f"- position: {match['position_match']:.0%} (chance {match['chance_position']:.0%})",
              f"- both: {match['both_match']:.0%}"]
    agree = report.get("text_image_agreement")
    if agree:
        lines += ["", "## Text-image agreement (the run's CLIP)", "", "| | generated | real |", "|---|---|---|",
                  f"| R-precision (chance {1 / len(report['prompts']):.0%}) | {agree['r_precision']:.0%} | "
                  f"{agree['real_r_precision']:.0%} |",
                  f"| CLIP score | {agree['clip_score']:.1f} | {agree['real_clip_score']:.1f} |",
                  f"| CMMD to real (x1000, 0 is best) | {agree['cmmd']:.3f} | |"]
    lines += ["", "![samples](samples.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
