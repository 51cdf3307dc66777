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


def build_site(folder: str, count: int, size: int, seed: int = 0, withhold: tuple[str, ...] = (),
               mismatched: float = 0.0) -> list[tuple[str, str, bool]]:
    """Write the built-in images (none of the `withhold` captions) as PNG files; returns (path, caption, planted)
    rows, where a `mismatched` fraction of planted rows carry another image's caption, as a web crawl does."""
    import random

    from pipeline.shapes import all_specs, generate

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rng = random.Random(seed + 1)
    others = [spec.caption for spec in all_specs() if spec.caption not in withhold]
    rows = []
    for i, (spec, image) in enumerate(generate(count, size=size, seed=seed, withhold=withhold)):
        image.save(os.path.join(folder, "img", f"{i}.png"))
        planted = rng.random() < mismatched
        caption = rng.choice([c for c in others if c != spec.caption]) if planted else spec.caption
        rows.append((f"img/{i}.png", caption, planted))
    return rows


def serve(folder: str) -> tuple[ThreadingHTTPServer, str]:
    """A static file server for `folder` on 127.0.0.1 (a free port), in a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def prompt_match(arrays, prompts: list[str], per_prompt: int) -> dict:
    """Fractions of samples ([B, H, W, 3] uint8, `per_prompt` per prompt in order) whose colour, shape,
    position, colour and position, and all three read off the pixels match their built-in prompt."""
    from pipeline.shapes import COLORS, describe, spec_of

    counts = {"color": 0, "shape": 0, "position": 0, "both": 0, "all": 0}
    for i, array in enumerate(arrays):
        wanted = spec_of(prompts[i // per_prompt])
        color, shape, position = describe(array)
        right = {"color": color == wanted.color, "shape": shape == wanted.shape, "position": position == wanted.position}
        for name in ("color", "shape", "position"):
            counts[name] += right[name]
        counts["both"] += right["color"] and right["position"]
        counts["all"] += all(right.values())
    n = max(len(arrays), 1)
    return {**{f"{name}_match": count / n for name, count in counts.items()},
            "chance_color": 1 / len(COLORS), "chance_shape": 1 / 3, "chance_position": 1 / 3,
            "chance_all": 1 / (9 * len(COLORS))}


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
    parser.add_argument("--images", type=int, default=None, help="size of the built-in data set (demo.images)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    from pipeline.console import setup_logging

    setup_logging()
    defaults = str(resources.files("jobs") / "configs" / "demo.yaml")
    overrides = list(args.set) + ([f"root={args.root}"] if args.root else []) + (
        [f"demo.images={args.images}"] if args.images is not None else [])

    started = time.time()
    server, planted = None, None
    with tempfile.TemporaryDirectory() as site:
        if args.url_list:
            url_list = args.url_list
        else:
            planned = load_config(RunConfig, defaults, overrides)
            claim_root(planned.root)  # before any work: the demo may delete its own stale inputs there
            rows = build_site(site, planned.demo.images, size=max(planned.download.image_size, 32),
                              withhold=tuple(planned.demo.withhold), mismatched=planned.demo.mismatched_captions)
            planted = [path for path, _, wrong in rows if wrong]
            server, base = serve(site)
            url_list = os.path.join(site, "urls.csv")
            with open(url_list, "w") as f:
                f.write("url,caption\n" + "".join(f"{base}/{path},{caption}\n" for path, caption, _ in rows))
            log.info("serving %d built-in images at %s", len(rows), base)
            # the built-in server is on 127.0.0.1, which the download policy refuses unless told; a user's
            # --url-list gets no such pass (download.allow_private_network is theirs to set)
            overrides.append("download.allow_private_network=true")
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

    # the demo's prompts, then the withheld combinations: every attribute seen in training, the combination not
    per_prompt, withheld = config.demo.samples_per_prompt, list(config.demo.withhold)
    seen = [prompt for prompt in PROMPTS if prompt not in withheld]
    images = generate(config.root, seen + withheld, n=per_prompt, cond_scale=config.train_decoder.cond_scale)
    root = config.root.rstrip("/")
    write_atomic(f"{root}/samples.png", grid_png(images, seen + [f"{p} (withheld)" for p in withheld]))
    from dalle2.text_to_image import to_uint8

    arrays = to_uint8(images)
    write_npy(f"{root}/samples.npy", arrays)
    split = len(seen) * per_prompt
    report = {"stages": outcome, "seconds_per_stage": timings, "seconds": round(time.time() - started, 1),
              "pipeline_seconds": round(stages_seconds, 1), "prompts": seen, "withheld_prompts": withheld,
              "samples_per_prompt": per_prompt, "prompt_match": prompt_match(arrays[:split], seen, per_prompt),
              "withheld_match": prompt_match(arrays[split:], withheld, per_prompt) if withheld else None,
              "text_image_agreement": agreement(config, images, seen + withheld, per_prompt),
              "filter": filter_check(config, planted), "status": run_status(config.root)}
    write_json(f"{root}/report.json", report)
    write_atomic(f"{root}/report.md", render_report(report).encode())
    from .report import build_report

    build_report(root)
    log.info("demo finished in %.0fs: %s/samples.png, %s/report.md", report["seconds"], root, root)
    print(json.dumps({k: report[k] for k in ("stages", "seconds_per_stage", "seconds", "prompt_match",
                                             "withheld_match", "text_image_agreement")}, default=str))
    return report


def filter_check(config, planted: Optional[list[str]]) -> Optional[dict]:
    """How the filter stage did on the rows the demo planted with a wrong caption (None when it did not run)."""
    from pipeline.filter import low_rank, low_similarity
    from pipeline.layout import KEY, REASON, URL, RunLayout
    from pipeline.storage import exists, list_files, read_json, read_parquet

    layout = RunLayout(config.root)
    if not config.filter.enabled or not exists(layout.ledger_summary("filter")):
        return None
    summary = read_json(layout.ledger_summary("filter"))
    out = {"rows_in": summary["rows_in"], "kept": summary["written"], "dropped_by_reason": summary["failed_by_reason"]}
    if planted is None:
        return out
    planted_paths = set(planted)
    planted_keys = set()
    for url in list_files(layout.shards, ".parquet"):
        shard = read_parquet(url, columns=[URL, KEY]).to_pydict()
        planted_keys.update(k for u, k in zip(shard[URL], shard[KEY]) if u.split("/", 3)[-1] in planted_paths)
    reasons = {}
    for url in list_files(layout.filter, ".parquet"):
        mask = read_parquet(url, columns=[KEY, REASON]).to_pydict()
        reasons.update(zip(mask[KEY], mask[REASON]))
    clip_reasons = {low_similarity(config.filter.min_similarity) if config.filter.min_similarity is not None else None,
                    low_rank(config.filter.max_caption_rank) if config.filter.max_caption_rank else None} - {None}
    out.update(planted_mismatched=len(planted_keys),
               planted_dropped=sum(1 for k in planted_keys if reasons.get(k) in clip_reasons),
               other_dropped_by_clip=sum(1 for k, r in reasons.items() if r in clip_reasons and k not in planted_keys))
    return out


DEMO_MARKER = "demo_run.json"  # written by the demo into a root it starts: what it may delete there is its own


def claim_root(root: str) -> None:
    """Mark `root` as the demo's run, or refuse naming it when it holds files and is not one: the demo deletes its
    stale `inputs/` (forget_stale_inputs), which in someone else's folder would be their files."""
    from pipeline.storage import exists, list_files, write_json

    from .config_io import ConfigError

    root = root.rstrip("/")
    if exists(f"{root}/{DEMO_MARKER}"):
        return
    found = list_files(root)
    if found and not made_by_an_earlier_demo(root):
        raise ConfigError(f"root: {root} already holds files ({', '.join(f.rsplit('/', 1)[-1] for f in found[:5])}"
                         f"{', ...' if len(found) > 5 else ''}) and is not a run the demo made (it has no {DEMO_MARKER}): "
                         "the demo would write into it and delete its inputs/ folder. Give a new or empty folder.")
    write_json(f"{root}/{DEMO_MARKER}", {"made_by": "dalle2 demo", "purpose": "marks a root whose inputs/ the demo "
                                         "may delete and split again"})


def made_by_an_earlier_demo(root: str) -> bool:
    """A root an earlier version of the demo ran in, before roots were claimed: its config.yaml names the demo's
    own URL list, a urls.csv in a temporary folder that the demo removed when it ended."""
    import yaml

    from pipeline.storage import exists, read_bytes

    try:
        config = yaml.safe_load(read_bytes(f"{root}/config.yaml"))
        url_list = config["download"]["url_list"]
    except Exception:  # noqa: BLE001 - no config.yaml, or not one of ours: not a demo run
        return False
    folder, name = os.path.split(str(url_list))
    return (name == "urls.csv" and os.path.dirname(folder) == tempfile.gettempdir()
            and os.path.basename(folder).startswith("tmp") and not exists(url_list))


def forget_stale_inputs(config) -> None:
    """A demo interrupted mid-download split URLs of a server port that is gone: split again (same order,
    same shard names); finished shards stay finished through their ledger records. Only in a root the demo made
    (claim_root): never anyone else's inputs/."""
    from pipeline.layout import RunLayout
    from pipeline.storage import exists, remove

    from .config_io import ConfigError
    from .stages import STAGES

    if not exists(f"{config.root.rstrip('/')}/{DEMO_MARKER}"):
        raise ConfigError(f"root: {config.root} is not a run the demo made (no {DEMO_MARKER}): its inputs/ "
                         "are left as they are")
    download = next(stage for stage in STAGES if stage.name == "download")
    if not download.complete(config):
        remove(RunLayout(config.root).inputs, recursive=True)


def agreement(config, images, prompts: list[str], per_prompt: int) -> dict:
    """R-precision, CLIP score (the run's CLIP) and CMMD of the samples, beside the same figures on real images
    of the same prompts (drawn as the built-in set draws them)."""
    import random

    import numpy as np
    import torch

    from dalle2.metrics import text_image_agreement
    from pipeline.shapes import draw, spec_of

    from .checkpoints import run_clip

    size, rng = images.shape[-1], random.Random(1)
    real = torch.stack([torch.from_numpy(np.asarray(draw(spec_of(p), size, jitter=0.08, rng=rng), np.float32) / 255)
                        .permute(2, 0, 1) for p in prompts for _ in range(per_prompt)])
    index = torch.arange(len(images)) // per_prompt
    return text_image_agreement(run_clip(config).eval(), images, prompts, index, real_images=real)


def render_report(report: dict) -> str:
    """The report as a short Markdown page (every value from the run's files escaped: md_cell)."""
    from .report import md_cell

    lines = ["# Demo report", "", f"Total time: {report['seconds']} s", "", "| stage | outcome | seconds |", "|---|---|---|"]
    for stage, outcome in report["stages"].items():
        lines.append(f"| {md_cell(stage)} | {md_cell(outcome)} | {md_cell(report['seconds_per_stage'].get(stage, ''))} |")
    lines += ["", "## Data", ""]
    for stage, info in report["status"].items():
        if "rows_in" in info:
            lines.append(f"- {md_cell(stage)}: {md_cell(info['rows_in'])} rows in, {md_cell(info['written'])} written, "
                         f"{md_cell(info['failed'])} failed {md_cell(info.get('failed_by_reason') or '')}")
    filtered = report.get("filter")
    if filtered:
        lines += ["", "## Filter", "", f"- {md_cell(filtered['rows_in'])} rows in, {md_cell(filtered['kept'])} kept, "
                  f"dropped: {md_cell(filtered['dropped_by_reason'] or 'none')}"]
        if "planted_mismatched" in filtered:
            lines.append(f"- captions planted on the wrong image: {filtered['planted_mismatched']}, dropped by the CLIP "
                         f"checks: {filtered['planted_dropped']}; other rows they dropped: {filtered['other_dropped_by_clip']}")
    lines += ["", "## Training", ""]
    for stage, info in report["status"].items():
        if "step" in info:
            metrics = {k: round(v, 4) for k, v in info.items() if isinstance(v, float)}
            lines.append(f"- {md_cell(stage)}: step {md_cell(info['step'])}, {md_cell(metrics)}")
    lines += ["", "## Do the samples match their prompts?", "",
              "Colour, shape and position read off the pixels of each sample; withheld prompts name combinations "
              "the data set left out (each attribute seen in training, the combination never).", "",
              "| prompts | colour | shape | position | all three |", "|---|---|---|---|---|"]
    for label, match in (("seen", report["prompt_match"]), ("withheld", report.get("withheld_match"))):
        if match:
            lines.append(f"| {label} | {match['color_match']:.0%} | {match['shape_match']:.0%} | "
                         f"{match['position_match']:.0%} | {match['all_match']:.0%} |")
    chance = report["prompt_match"]
    lines.append(f"| chance | {chance['chance_color']:.0%} | {chance['chance_shape']:.0%} | "
                 f"{chance['chance_position']:.0%} | {chance['chance_all']:.0%} |")
    agree = report.get("text_image_agreement")
    if agree:
        lines += ["", "## Text-image agreement (the run's CLIP)", "", "| | generated | real |", "|---|---|---|",
                  f"| R-precision (chance {1 / (len(report['prompts']) + len(report.get('withheld_prompts', []))):.0%}) | {agree['r_precision']:.0%} | "
                  f"{agree['real_r_precision']:.0%} |",
                  f"| CLIP score | {agree['clip_score']:.1f} | {agree['real_clip_score']:.1f} |",
                  f"| CMMD to real, as the paper's code (x1000, 0 is best; above 0 on small sets) | {agree['cmmd']:.3f} | |"]
        if "cmmd_unbiased" in agree:  # runs from before it have only the paper's figure
            lines.append(f"| CMMD to real, unbiased (x1000, 0 for one distribution) | {agree['cmmd_unbiased']:.3f} | |")
    lines += ["", "![samples](samples.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
