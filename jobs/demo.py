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

# The built-in set's CLIP is trained from scratch (on the planted noise too): its cosines crowd into 0.6-0.9 for right
# and wrong captions alike, but it still ranks an image's own caption first among the shard's captions; the set
# draws each of its 51 combinations dozens of times, so many images are pixel for pixel the same.
BUILT_IN_FILTER = ["filter.max_caption_rank=1", "filter.duplicate_threshold=0.9995"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # thousands of requests: keep the log readable
        pass


def build_site(folder: str, count: int, size: int, seed: int = 0, withhold: tuple[str, ...] = (),
               mismatched: float = 0.0, colors: tuple[str, ...] | None = None) -> list[tuple[str, str, bool]]:
    """Write the built-in images (of `colors`, default every colour; none of the `withhold` captions) as PNG files;
    returns (path, caption, planted) rows, where a `mismatched` fraction of planted rows carry another image's
    caption, as a web crawl does."""
    import random

    from jobs.shapes import all_specs, generate

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rng = random.Random(seed + 1)
    others = [spec.caption for spec in all_specs(colors) if spec.caption not in withhold]
    rows = []
    for i, (spec, image) in enumerate(generate(count, size=size, seed=seed, withhold=withhold, colors=colors)):
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


def prompt_match(arrays, prompts: list[str], per_prompt: int, colors: Optional[list[str]] = None) -> dict:
    """Fractions of samples ([B, H, W, 3] uint8, `per_prompt` per prompt in order) whose colour, shape,
    position, colour and position, and all three read off the pixels match their built-in prompt; chance levels
    for a data set drawing `colors` (None: the whole palette)."""
    from jobs.shapes import COLORS, describe, spec_of

    counts = {"color": 0, "shape": 0, "position": 0, "both": 0, "all": 0}
    for i, array in enumerate(arrays):
        wanted = spec_of(prompts[i // per_prompt])
        color, shape, position = describe(array)
        right = {"color": color == wanted.color, "shape": shape == wanted.shape, "position": position == wanted.position}
        for name in ("color", "shape", "position"):
            counts[name] += right[name]
        counts["both"] += right["color"] and right["position"]
        counts["all"] += all(right.values())
    n, palette = max(len(arrays), 1), len(colors or COLORS)
    return {**{f"{name}_match": count / n for name, count in counts.items()},
            "chance_color": 1 / palette, "chance_shape": 1 / 3, "chance_position": 1 / 3,
            "chance_all": 1 / (9 * palette)}


def judge_samples(config, built_in: bool) -> dict:
    """Generate the demo's samples (samples.png, samples.npy) and judge them. The built-in set: its prompts, then
    the withheld combinations (every attribute seen in training, the combination not), scored off the pixels. A
    user's list: captions of its own held-out rows, each drawn beside a real image of it; no shape scores."""
    import torch

    from dalle2.text_to_image import to_uint8
    from pipeline.run.storage import write_atomic, write_npy

    from .demo_report import agreement, held_out_prompts
    from .sample import generate, grid_png
    from .shapes import seen_prompts

    per_prompt, root = config.demo.samples_per_prompt, config.root.rstrip("/")
    if built_in:
        withheld = list(config.demo.withhold)
        prompts = seen_prompts(withheld, config.demo.colors)
        images, used = generate(config.root, prompts + withheld, n=per_prompt)
        write_atomic(f"{root}/samples.png", grid_png(images, prompts + [f"{p} (withheld)" for p in withheld]))
        arrays = to_uint8(images)
        split = len(prompts) * per_prompt
        judged = {"prompts": prompts, "withheld_prompts": withheld,
                  "prompt_match": prompt_match(arrays[:split], prompts, per_prompt, colors=config.demo.colors),
                  "withheld_match": (prompt_match(arrays[split:], withheld, per_prompt, colors=config.demo.colors)
                                     if withheld else None),
                  "text_image_agreement": agreement(config, images, prompts + withheld, per_prompt)}
    else:
        from pipeline.stages.holdout import ensure_holdout

        from .checkpoints import training_jobs

        # a run whose stages were all done before splits existed draws one now, and says so
        ensure_holdout(config.root, config.holdout, trained=tuple(training_jobs(config.root)))
        prompts, real, real_set = held_out_prompts(config.root, config.demo.prompts, per_prompt,
                                                   config.download.image_size)
        images, used = generate(config.root, prompts, n=per_prompt)
        real, real_set = (torch.nn.functional.interpolate(x, size=images.shape[-2:], mode="bilinear", antialias=True)
                          for x in (real, real_set))
        # each row: the samples, then one real image of that caption
        rows = torch.cat([images.unflatten(0, (len(prompts), per_prompt)), real[::per_prompt, None]], dim=1)
        write_atomic(f"{root}/samples.png", grid_png(rows.flatten(0, 1), [f"{p} (generated | real)" for p in prompts]))
        arrays = to_uint8(images)
        judged = {"prompts": prompts, "withheld_prompts": [], "prompt_match": None, "withheld_match": None,
                  "text_image_agreement": agreement(config, images, prompts, per_prompt, real=real, real_set=real_set)}
    write_npy(f"{root}/samples.npy", arrays)
    # the report says how they were drawn (the run's `sampling`, which `dalle2 sample` defaults to as well)
    return {**judged, "samples_per_prompt": per_prompt, "sampling": used.model_dump(mode="json")}


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the demo; returns its report."""
    from pipeline.run.storage import write_atomic, write_json

    from .config_io import load_config
    from .demo_report import filter_check, render_report
    from .run_config import RunConfig
    from .stage import run_session
    from .stages import run_all
    from .status import run_status

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="where the run goes (default: runs/demo)")
    parser.add_argument("--url-list", default=None, help="a csv with url and caption columns instead of the built-in set")
    parser.add_argument("--images", type=int, default=None, help="size of the built-in data set (demo.images)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    from pipeline.execution.console import setup_logging

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
                              withhold=tuple(planned.demo.withhold), mismatched=planned.demo.mismatched_captions,
                              colors=planned.demo.colors)
            planted = [path for path, _, wrong in rows if wrong]
            server, base = serve(site)
            url_list = os.path.join(site, "urls.csv")
            with open(url_list, "w") as f:
                f.write("url,caption\n" + "".join(f"{base}/{path},{caption}\n" for path, caption, _ in rows))
            log.info("serving %d built-in images at %s", len(rows), base)
            # the built-in server is on 127.0.0.1, which the download policy refuses unless told; a user's
            # --url-list gets no such pass (download.allow_private_network is theirs to set)
            overrides.append("download.allow_private_network=true")
            # the filter settings tuned for the built-in set, before the user's own --set (which win); a user's
            # list gets the filter's defaults, whose CLIP rules are checked on its held-out rows first
            overrides[:0] = BUILT_IN_FILTER
        overrides.append(f"download.url_list={url_list}")
        config = load_config(RunConfig, defaults, overrides)
        if server is not None:
            forget_stale_inputs(config)
        timings = {}
        stage_started = time.time()
        with run_session(config) as session:  # the demo's one Ray, stopped before its samples are drawn
            outcome = run_all(config, session, timings=timings)
        if server is not None:
            server.shutdown()
        stages_seconds = time.time() - stage_started

    report = {"stages": outcome, "seconds_per_stage": timings, "pipeline_seconds": round(stages_seconds, 1),
              "data": "your list" if args.url_list else "built-in", **judge_samples(config, built_in=not args.url_list),
              "filter": filter_check(config, planted), "status": run_status(config.root)}
    report["seconds"] = round(time.time() - started, 1)
    root = config.root.rstrip("/")
    write_json(f"{root}/report.json", report)
    write_atomic(f"{root}/report.md", render_report(report).encode())
    from .report import build_report

    build_report(root)
    log.info("demo finished in %.0fs: %s/samples.png, %s/report.md", report["seconds"], root, root)
    print(json.dumps({k: report[k] for k in ("stages", "seconds_per_stage", "seconds", "prompt_match",
                                             "withheld_match", "text_image_agreement")}, default=str), flush=True)
    log.info("try the model: `dalle2 serve --root %s`, then open http://127.0.0.1:%d/ (generate, vary, search its "
             "training images); or `dalle2 sample --root %s --prompt \"a red circle on the left\"`", root,
             config.serve.port, root)
    return report


DEMO_MARKER = "demo_run.json"  # written by the demo into a root it starts: what it may delete there is its own


def claim_root(root: str) -> None:
    """Mark `root` as the demo's run, or refuse naming it when it holds files and is not one: the demo deletes its
    stale `inputs/` (forget_stale_inputs), which in someone else's folder would be their files."""
    from pipeline.run.storage import exists, list_files, write_json

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

    from pipeline.run.storage import exists, read_bytes

    from .run_config import CONFIG_NAME

    try:
        config = yaml.safe_load(read_bytes(f"{root}/{CONFIG_NAME}"))
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
    from pipeline.run.layout import RunLayout
    from pipeline.run.storage import exists, remove

    from .config_io import ConfigError
    from .stages import stage_named

    if not exists(f"{config.root.rstrip('/')}/{DEMO_MARKER}"):
        raise ConfigError(f"root: {config.root} is not a run the demo made (no {DEMO_MARKER}): its inputs/ "
                         "are left as they are")
    if not stage_named("download").complete(config):
        remove(RunLayout(config.root).inputs, recursive=True)


if __name__ == "__main__":
    main()
