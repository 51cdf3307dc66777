"""The run's data index: faiss over the training rows' CLIP image embeddings, and searching it.

    dalle2 index --root RUN | --config run.yaml [--set index.kind=ivf_pq ...]   build it (a stage of `dalle2 run`)
    dalle2 index --root RUN --query "a red circle" [--query ...] [--query-image IMAGE] [--k 8] [--out hits.png]

A search prints one JSON line per query (its hits: key, caption, similarity) and writes a grid of the hits' images,
a row per query.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from .run_config import RunConfig
from .stage import Stage


def run(config: RunConfig, session) -> dict:
    """Build the index of the rows training reads, with a progress bar over the shards."""
    from pipeline.execution.console import progress_bar
    from pipeline.formats.aligned import aligned_shards
    from pipeline.run.layout import RunLayout
    from pipeline.stages.index import build_index

    with progress_bar(total=len(aligned_shards(RunLayout(config.root))), desc="index", unit="shards") as bar:
        return build_index(config.root, config.index, filtered=config.filter.enabled, progress=bar.update)


def complete(run: RunConfig) -> bool:
    """The index holds every row training reads, built with the settings the run now has."""
    from pipeline.loaders.plan import SamplePlan
    from pipeline.run.layout import RunLayout
    from pipeline.run.storage import exists, read_json

    summary_path = RunLayout(run.root).index_summary
    if not exists(summary_path):
        return False
    summary = read_json(summary_path)
    if summary.get("config") != run.index.model_dump(mode="json") or summary.get("filtered") != run.filter.enabled:
        return False
    try:
        return summary["rows"] == SamplePlan.from_aligned(run.root, filtered=run.filter.enabled, part="train").size
    except (FileNotFoundError, ValueError):
        return False


STAGE = Stage("index", "index the training rows' image embeddings (faiss) for search", run, complete,
              wanted=lambda run: run.index.enabled)


def search(argv: list[str]) -> list[list]:
    """`dalle2 index --root RUN --query ...`: print each query's hits as a JSON line and write their images' grid."""
    import torch

    from dalle2.text_to_image import to_uint8
    from pipeline.execution.console import setup_logging
    from pipeline.run.storage import write_atomic

    from .generation import ImageError, decode_image, read_image
    from .grids import labelled_grid
    from .sample import stack
    from .search import RunSearch

    parser = argparse.ArgumentParser(prog="dalle2 index", description="search the run's training rows")
    parser.add_argument("--root", required=True)
    parser.add_argument("--query", action="append", default=[], help="a text (repeatable)")
    parser.add_argument("--query-image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--k", type=int, default=8, help="hits per query")
    parser.add_argument("--out", default="hits.png", help="the grid of the hits' images, a row per query")
    args = parser.parse_args(argv)
    if not 1 <= args.k <= 1000:
        raise SystemExit("dalle2 index: --k must be in [1, 1000]")
    setup_logging()
    runs = RunSearch(args.root)
    hits = runs.by_text(args.query, args.k) if args.query else []
    if args.query_image:
        try:
            images = [read_image(path) for path in args.query_image]
        except ImageError as error:
            raise SystemExit(f"dalle2 index: {error}") from None
        for image in images:  # each as CLIP preprocesses any size (shortest side, centre crop), as the rows were
            hits += runs.by_image(image[None], args.k)
    for query, found in zip(args.query + args.query_image, hits):
        print(json.dumps({"query": query, "hits": [{"key": h.key, "caption": h.caption,
                                                    "similarity": round(h.similarity, 4)} for h in found]}))
    pictures = []  # every hit's image, query-major, each row padded with white to k
    for found in hits:
        row = [decode_image(data, h.key) if (data := runs.image(h)) else torch.full((3, 8, 8), 0.5)  # grey: gone
               for h in found]
        pictures += row + [torch.ones(3, 8, 8)] * (args.k - len(row))
    if pictures:
        side = max(p.shape[-1] for p in pictures)
        grid = to_uint8(stack(pictures, side))
        write_atomic(args.out, labelled_grid(grid, args.query + args.query_image, columns=args.k))
    return hits


def main(argv: Optional[list[str]] = None) -> object:
    """Search when a query is given, else build the index as a stage (of --config, or of the run at --root)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("--query") for a in argv):
        return search(argv)
    if "--root" in argv[:-1]:  # the run's own config, as it was last run
        from pipeline.run.storage import exists

        from .run_config import CONFIG_NAME

        at = argv.index("--root")
        root, argv = argv[at + 1], argv[:at] + argv[at + 2:]
        saved = f"{root.rstrip('/')}/{CONFIG_NAME}"
        argv = (["--config", saved] if exists(saved) else []) + ["--set", f"root={root}", *argv]
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
