"""Write shard-aligned embeddings from clip-retrieval output (rows in any order).

    python -m jobs.reorder --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

from typing import Optional

from pipeline.run.layout import REORDER

from .run_config import RunConfig
from .stage import Stage, ledger_complete


def run(config: RunConfig, session) -> dict:
    """Align the clip-retrieval embeddings named by reorder.source with the run's shards."""
    from pipeline.stages.reorder import run_reorder

    return run_reorder(config.reorder, config.root, session)


STAGE = Stage("reorder", "align clip-retrieval embeddings with the shards", run,
              complete=lambda run: ledger_complete(run, REORDER), wanted=lambda run: bool(run.reorder.source))


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the reorder stage of the run described by --config."""
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
