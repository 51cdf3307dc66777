"""A run's dataset report: one self-contained HTML page (images inline) and the PNG plots it shows.

    dalle2 report --root RUN [--samples 12]

Writes <root>/report.html and <root>/report/*.png: download outcomes per shard, image sizes and aspect
ratios, caption lengths, the CLIP-similarity histogram with the filter's threshold, near-duplicate group
sizes, random kept rows with their captions and dropped rows with their reasons, training loss and
evaluation curves, and the latest sample grids. `dalle2 run` and `dalle2 demo` write it at the end.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import random
from typing import Optional

log = logging.getLogger(__name__)

MAX_SHARDS = 32  # shards read for the image, caption and filter statistics: a big run is sampled
SAMPLE_SHARDS = 3  # shards whose tars the kept and dropped rows shown are read from
PLOT_NAMES = ("download_outcomes", "image_sizes", "caption_lengths", "clip_similarity", "duplicate_groups",
              "training_loss", "evaluation")


MARKDOWN_SPECIAL = "\\`*_[]|$"  # escaped with a backslash in a Markdown cell: emphasis, links, tables, math


def md_cell(value) -> str:
    """`value` as text inside one Markdown table cell or list item: HTML escaped (renderers pass raw HTML through),
    Markdown's specials (`|` ends a cell, `$` starts math) backslash-escaped, and newlines made spaces."""
    text = html.escape(str(value), quote=False)
    text = "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in text)
    return " ".join(text.splitlines())


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def thumbnail(encoded: bytes, size: int = 96) -> str:
    """A data URI of an encoded image enlarged (or reduced) to `size` px on its longer side."""
    from PIL import Image

    image = Image.open(io.BytesIO(encoded)).convert("RGB")
    scale = size / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


def shard_statistics(root: str) -> dict:
    """Original sizes and captions of the downloaded images of up to MAX_SHARDS shards."""
    from pipeline.run.layout import CAPTION, RunLayout
    from pipeline.run.storage import list_files, read_parquet

    widths, heights, captions = [], [], []
    for url in sorted(list_files(RunLayout(root).shards, ".parquet"))[:MAX_SHARDS]:
        table = read_parquet(url).to_pydict()
        ok = [i for i, status in enumerate(table.get("status", [])) if status == "success"]
        captions += [table[CAPTION][i] or "" for i in ok]
        if "original_width" in table:
            widths += [table["original_width"][i] for i in ok if table["original_width"][i]]
            heights += [table["original_height"][i] for i in ok if table["original_width"][i]]
    return {"widths": widths, "heights": heights, "captions": captions}


def filter_rows(root: str) -> list[dict]:
    """The present rows of the filter's masks (key, keep, reason, similarity, duplicate_of, shard) of up to
    MAX_SHARDS shards: a big run is sampled."""
    from pipeline.run.layout import RunLayout
    from pipeline.run.storage import list_files, read_parquet

    rows = []
    for url in sorted(list_files(RunLayout(root).filter, ".parquet"))[:MAX_SHARDS]:
        shard = url.rsplit("/", 1)[-1][: -len(".parquet")]
        rows += [{**row, "shard": shard} for row in read_parquet(url).to_pylist() if row["reason"] != "absent"]
    return rows


def sample_rows(root: str, rows: list[dict], undecodable: list[str]) -> list[tuple[str, str, str]]:
    """(key, thumbnail data URI, caption) of filter `rows` (with their shard), read from the shards' tars; the key
    of an image that does not decode, or in a tar the reader refuses, is appended to `undecodable` and the row left
    out."""
    from pipeline.run.layout import RunLayout
    from pipeline.formats.shard_reader import ShardReadError, image_of, iter_samples

    layout, found = RunLayout(root), {}
    by_shard: dict[str, set] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], set()).add(row["key"])
    keys = [row["key"] for row in rows]
    for shard, wanted in by_shard.items():
        try:
            for key, fields in iter_samples(layout.shard_tar(shard)):
                if key in wanted and image_of(fields):
                    wanted.discard(key)
                    try:
                        uri = thumbnail(image_of(fields))
                    except Exception as error:  # noqa: BLE001 - any decoder error: one row fewer, counted and named
                        log.warning("report: the image of %s does not decode (%s): not shown", key, error)
                        undecodable.append(key)
                        continue
                    found[key] = (uri, fields.get("txt", b"").decode("utf-8", "replace"))
                    if not wanted:
                        break  # the rest of the tar is not read
        except ShardReadError as error:  # a damaged tar: its rows not yet found are not shown, counted and named
            log.warning("report: %s: %d rows not shown", error, len(wanted))
            undecodable.extend(sorted(wanted))
    return [(key, *found[key]) for key in keys if key in found]


def figure_html(name: str, png: bytes, caption: str) -> str:
    return (f'<figure class="plot" id="{name}"><img alt="{html.escape(caption)}" src="{data_uri(png)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def samples_html(title: str, rows: list[tuple[str, str, str]], notes: dict[str, str]) -> str:
    cells = "".join(f'<div class="cell"><img src="{uri}" alt="{html.escape(key)}"><p>{html.escape(caption)}</p>'
                    f'<p class="note">{html.escape(notes.get(key, ""))}</p></div>' for key, uri, caption in rows)
    return f"<h3>{html.escape(title)}</h3><div class=\"grid\">{cells or '<p>none</p>'}</div>"


def build_report(root: str, samples: int = 12, seed: int = 0) -> dict:
    """Write <root>/report.html and <root>/report/*.png; returns {"html": url, "plots": [names]}."""
    from pipeline.run.layout import RunLayout, TrainLayout
    from pipeline.run.storage import exists, list_files, read_bytes, read_json, write_atomic

    from . import plots
    from .run_config import load_run_config
    from .status import run_status
    from .checkpoints import training_jobs
    from .training.history import read_history

    root = root.rstrip("/")
    layout, config, status = RunLayout(root), load_run_config(root), run_status(root)
    rng = random.Random(seed)
    figures: dict[str, tuple[bytes, str]] = {}
    body = [f"<h1>Dataset report</h1><p>Run: <code>{html.escape(root)}</code></p>", stage_table(status)]

    if exists(layout.ledger_summary("download")):
        per_shard = read_json(layout.ledger_summary("download")).get("per_shard") or {}
        if per_shard:
            figures["download_outcomes"] = (plots.download_outcomes(per_shard), "Rows written and failed (by reason) per shard")
    stats = shard_statistics(root)
    if stats["widths"]:
        figures["image_sizes"] = (plots.image_sizes(stats["widths"], stats["heights"]),
                                  f"Sizes of {len(stats['widths'])} downloaded images before resizing")
    if stats["captions"]:
        figures["caption_lengths"] = (plots.caption_lengths(stats["captions"]), f"{len(stats['captions'])} captions")

    rows = filter_rows(root)
    # the settings the masks were made with (the filter's fingerprint), not whatever the config says now
    made_with = read_json(layout.ledger_fingerprint("filter")) if exists(layout.ledger_fingerprint("filter")) else \
        config.filter.model_dump()
    kept_notes: dict[str, str] = {}
    dropped_notes: dict[str, str] = {}
    shown_kept: list[dict] = []
    shown_dropped: list[dict] = []
    if rows:
        threshold = made_with.get("min_similarity")
        figures["clip_similarity"] = (plots.similarity_histogram([r["similarity"] for r in rows], threshold),
                                      f"CLIP cosine of each image with its caption ({len(rows)} rows)" +
                                      ("; rows left of the line are dropped" if threshold is not None else ""))
        figures["duplicate_groups"] = (plots.duplicate_groups([r["duplicate_of"] for r in rows]),
                                       f"near-duplicates: image cosine above {made_with.get('duplicate_threshold')}"
                                       if made_with.get("duplicate_threshold") else "near-duplicate search is off")
        # the rows shown come from a few shards, so a big run's report reads a few tars, not one per row
        shards = sorted({r["shard"] for r in rows})
        few = set(rng.sample(shards, min(SAMPLE_SHARDS, len(shards))))
        kept = [r for r in rows if r["keep"] and r["shard"] in few]
        dropped = [r for r in rows if not r["keep"] and r["shard"] in few]
        shown_kept, shown_dropped = rng.sample(kept, min(samples, len(kept))), rng.sample(dropped, min(samples, len(dropped)))
        for r in shown_kept:
            kept_notes[r["key"]] = f"similarity {r['similarity']:.2f}"
        for r in shown_dropped:
            dropped_notes[r["key"]] = r["reason"] + (f" of {r['duplicate_of']}" if r["duplicate_of"] else "") + \
                f" (similarity {r['similarity']:.2f})"

    histories = {job: read_history(root, job) for job in training_jobs(root)}
    histories = {job: lines for job, lines in histories.items() if lines}
    if histories:
        figures["training_loss"] = (plots.training_curves(histories), "Training loss of each job")
        figures["evaluation"] = (plots.evaluation_curves(histories), "Held-out metrics at each evaluation")

    for name, (png, _) in figures.items():
        write_atomic(f"{root}/report/{name}.png", png)
    sections = [("Download", ["download_outcomes"]), ("Images and captions", ["image_sizes", "caption_lengths"]),
                ("Filter", ["clip_similarity", "duplicate_groups"]), ("Training", ["training_loss", "evaluation"])]
    for title, names in sections:
        shown = [figure_html(n, *figures[n]) for n in names if n in figures]
        if shown:
            body.append(f"<h2>{title}</h2>" + "".join(shown))
        if title == "Filter":
            body.append(clip_check_html(layout))
        if title == "Filter" and rows:
            undecodable: list[str] = []
            body.append(samples_html(f"{len(shown_kept)} random kept rows", sample_rows(root, shown_kept, undecodable),
                                     kept_notes))
            body.append(samples_html(f"{len(shown_dropped)} random dropped rows, with their reasons",
                                     sample_rows(root, shown_dropped, undecodable), dropped_notes))
            if undecodable:
                body.append(f'<p class="note" id="undecodable">{len(undecodable)} of the rows picked have an image '
                            f"that does not decode and are not shown: {html.escape(', '.join(undecodable))}</p>")
    grids = []
    if exists(f"{root}/samples.png"):
        grids.append(("Samples of the finished model (samples.png)", read_bytes(f"{root}/samples.png")))
    for job in (j for j in histories if j.startswith("decoder")):
        steps = list_files(TrainLayout(root).sample_grids(job), ".png")
        if steps:
            latest = max(steps, key=lambda url: int(url.rsplit("_", 1)[-1][: -len(".png")]))
            grids.append((f"{job}: latest evaluation grid ({latest.rsplit('/', 1)[-1]})", read_bytes(latest)))
    if grids:
        body.append("<h2>Samples</h2>" + "".join(
            f'<figure class="grid-image"><img src="{data_uri(png)}" alt="{html.escape(title)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>" for title, png in grids))
    write_atomic(f"{root}/report.html", page("".join(body)).encode())
    log.info("report: %s/report.html (%d plots)", root, len(figures))
    return {"html": f"{root}/report.html", "plots": list(figures)}


def clip_check_html(layout) -> str:
    """How well the run's CLIP retrieves its held-out captions, and whether the filter let it judge (empty before
    the filter ran)."""
    from pipeline.run.storage import exists, read_json

    summary = read_json(layout.ledger_summary("filter")) if exists(layout.ledger_summary("filter")) else {}
    check = summary.get("clip_check") or {}
    if not check:
        return ""
    if not check.get("checked"):
        return f'<p class="note" id="clip-check">CLIP not checked: {html.escape(str(check.get("why", "")))}</p>'
    skipped = check.get("skipped_rules", check["rules"] if check.get("skipped") else [])
    applied = [rule for rule in check.get("rules", []) if rule not in skipped]
    verdict = "; ".join(([f"{', '.join(skipped)} skipped: no row was dropped on its judgement"] if skipped else []) +
                        ([f"{', '.join(applied)} applied"] if applied else [])) or "no CLIP rule is set"
    return (f'<p class="note" id="clip-check">The run\'s CLIP picks a held-out image\'s own caption among '
            f"{check['captions']} held-out captions {check['retrieval']:.0%} of the time (chance {check['chance']:.0%}), "
            f"against 9 others {check.get('retrieval_of_10', float('nan')):.0%} (chance 10%); the caption-rank rule "
            f"judges from {check['min_clip_retrieval']:.0%} of the first, the similarity rule of the second: "
            f"{html.escape(verdict)}.</p>")


def stage_table(status: dict) -> str:
    """The ledger of every data stage as an HTML table, with any problems under it."""
    rows = []
    for stage, info in status.items():
        if isinstance(info, dict) and "rows_in" in info:
            reasons = ", ".join(f"{n} {r}" for r, n in (info.get("failed_by_reason") or {}).items()) or "none"
            cells = (stage, info["rows_in"], info["written"], info["failed"], reasons)
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in status.get("problems", []))
    return ("<table><tr><th>stage</th><th>rows in</th><th>written / kept</th><th>failed / dropped</th>"
            f"<th>by reason</th></tr>{''.join(rows)}</table>" + (f"<h3>Problems</h3><ul>{problems}</ul>" if problems else ""))


def page(body: str) -> str:
    """The HTML page around `body`; after loading it records how many images the browser decoded."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "figure{display:inline-block;margin:0.5em}figcaption{font-size:0.85em;color:#555}"
             ".grid{display:flex;flex-wrap:wrap}.cell{width:150px;margin:4px;font-size:0.75em}"
             ".cell img{image-rendering:pixelated}.note{color:#a33}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:0.9em}")
    script = ("window.addEventListener('load',function(){var shown=0;for(var i=0;i<document.images.length;i++)"
              "{if(document.images[i].complete&&document.images[i].naturalWidth>0)shown++;}"
              "document.body.setAttribute('data-images-shown',shown+'/'+document.images.length);});")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Dataset report</title><style>{style}</style>"
            f"<script>{script}</script></head><body>{body}</body></html>")


def main(argv: Optional[list[str]] = None) -> dict:
    """Write the report of the run at --root."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the run's root (local path or fsspec URL)")
    parser.add_argument("--samples", type=int, default=12, help="kept and dropped rows shown")
    args = parser.parse_args(argv)
    from pipeline.execution.console import setup_logging

    setup_logging()
    from pipeline.run.storage import absolute_root

    result = build_report(absolute_root(args.root), samples=args.samples)
    print(result["html"])
    return result


if __name__ == "__main__":
    main()
