"""Choose the aligned rows training reads: caption rules, CLIP similarity, near-duplicates (faiss).

    python -m jobs.filter --config run.yaml [--set filter.min_similarity=0.28 ...]
"""

from __future__ import annotations

from typing import Optional

from .run_config import RunConfig
from .stage import Stage, ledger_complete


def run(config: RunConfig, session) -> dict:
    """The filter stage with the run's held-out rows (drawn here when no training stage drew them yet)."""
    from pipeline.stages.filter.stage import run_filter
    from pipeline.stages.holdout import ensure_holdout

    from .checkpoints import training_jobs

    holdout = ensure_holdout(config.root, config.holdout, trained=tuple(training_jobs(config.root)))
    return run_filter(config.filter, config.root, session, holdout=holdout)


def complete(run: RunConfig) -> bool:
    """Every aligned shard has its mask, none failed, made under the settings the run now has."""
    from pipeline.formats.aligned import aligned_shards
    from pipeline.run.config import FilterConfig
    from pipeline.run.layout import FILTER, RunLayout
    from pipeline.run.ledger import Ledger
    from pipeline.stages.filter.stage import fingerprint

    layout = RunLayout(run.root)
    ledger = Ledger(layout, FILTER)
    if ledger.fingerprint_changes(fingerprint(run.filter), defaults=fingerprint(FilterConfig())):
        return False  # made under other settings: not complete; the stage says why and stops
    shards = aligned_shards(layout)
    return ledger_complete(run, FILTER) and bool(shards) and set(shards) <= ledger.done()


STAGE = Stage("filter", "choose the rows training reads: caption rules, CLIP similarity, near-duplicates", run,
              complete, wanted=lambda run: run.filter.enabled)


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the filter stage of the run described by --config."""
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
