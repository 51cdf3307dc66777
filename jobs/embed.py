"""Embed every image and caption of the run's shards with CLIP (Ray Data actor pool).

    python -m jobs.embed --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

from typing import Optional

from pipeline.embed import run_embed

from .run_config import stage_main


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the embed stage of the run described by --config."""
    return stage_main(argv, __doc__.splitlines()[0], lambda c: run_embed(c.embed, c.root, c.ray))


if __name__ == "__main__":
    main()
