"""Write shard-aligned embeddings from clip-retrieval output (rows in any order).

    python -m jobs.reorder --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

from typing import Optional

from pipeline.stages.reorder import run_reorder

from .run_config import stage_main


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the reorder stage of the run described by --config."""
    return stage_main(argv, __doc__.splitlines()[0], lambda c: run_reorder(c.reorder, c.root, c.ray))


if __name__ == "__main__":
    main()
