"""Choose the aligned rows training reads: caption rules, CLIP similarity, near-duplicates (faiss).

    python -m jobs.filter --config run.yaml [--set filter.min_similarity=0.28 ...]
"""

from __future__ import annotations

from typing import Optional

from .run_config import RunConfig, stage_main


def run(config: RunConfig) -> dict:
    """The filter stage with the run's held-out rows (drawn here when no training stage drew them yet)."""
    from pipeline.stages.filter.stage import run_filter
    from pipeline.stages.holdout import ensure_holdout

    from .train_common import training_jobs

    holdout = ensure_holdout(config.root, config.holdout, trained=tuple(training_jobs(config.root)))
    return run_filter(config.filter, config.root, config.ray, holdout=holdout)


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the filter stage of the run described by --config."""
    return stage_main(argv, __doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
