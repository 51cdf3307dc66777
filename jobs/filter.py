"""Choose the aligned rows training reads: caption rules, CLIP similarity, near-duplicates (faiss).

    python -m jobs.filter --config run.yaml [--set filter.min_similarity=0.28 ...]
"""

from __future__ import annotations

from typing import Optional

from pipeline.filter import run_filter

from .run_config import stage_main


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the filter stage of the run described by --config."""
    return stage_main(argv, __doc__.splitlines()[0], lambda c: run_filter(c.filter, c.root, c.ray))


if __name__ == "__main__":
    main()
