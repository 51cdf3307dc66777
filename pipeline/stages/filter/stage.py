"""The filter stage: which aligned rows training reads, with a reason for every row it does not.

Two passes, as LAION curated its crawl:

1. per shard (a Ray task each): caption rules (length, optionally fastText language id), the CLIP
   similarity of each image with its caption against `min_similarity`, where its caption ranks among the
   shard's distinct captions for that image against `max_caption_rank`, and exact near-duplicate removal
   inside the shard (image cosine above `duplicate_threshold`: the first in index order is kept);
2. across the run (the driver, shards in order): each shard's remaining rows are searched in a faiss index
   of the rows kept so far; a match drops the row as a duplicate of an earlier shard's, the rest are kept
   and added. With an IVF index the search is approximate and memory bounded.

The result is `<root>/filter/{shard}.parquet`: one row per aligned row (index, key, keep, reason, similarity,
duplicate_of). Nothing is deleted or rewritten; the loaders read only kept rows. The ledger counts rows in
(the present aligned rows), kept (written) and dropped by reason, so `dalle2 status` reconciles it.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from pipeline.execution.distributor import run_shards
from pipeline.execution.session import RaySession, require_session
from pipeline.formats.aligned import aligned_shards
from pipeline.formats.holdout import Holdout
from pipeline.formats.queries import usable_indices
from pipeline.run.config import FilterConfig
from pipeline.run.layout import FILTER, RunLayout
from pipeline.run.ledger import Ledger
from pipeline.run.storage import exists, list_names, remove
from pipeline.stages.filter.duplicates import across_the_run
from pipeline.stages.filter.shards import ShardFilter

log = logging.getLogger(__name__)

STAGE = FILTER


def fingerprint(config: FilterConfig) -> dict:
    """The settings a run's masks are made under (where the work runs does not count)."""
    return {k: v for k, v in config.model_dump(mode="json").items()
            if k not in ("cpus_per_task", "distributor", "resources", "max_clip_drop", "on_large_clip_drop")}


def present_rows(layout: RunLayout, shard: str) -> int:
    """The filter's input rows of a shard, from its aligned parquet alone (0 if that cannot be read either)."""
    try:
        return len(usable_indices(layout, shard, "aligned"))
    except Exception:  # noqa: BLE001 - the shard's error is recorded anyway
        return 0


def run_filter(config: FilterConfig, root: str, session: RaySession, holdout: Optional[Holdout] = None) -> dict:
    """Write the keep mask of every aligned shard; returns the stage summary. With the run's `holdout`, the CLIP
    rules judge only when the run's CLIP retrieves the held-out captions well (pipeline/stages/filter/guard.py)."""
    from pipeline.stages.filter.guard import check_model_drops, model_drops, trusted_config

    require_session(session, "run_filter")
    started = time.time()
    layout = RunLayout(root)
    shards = aligned_shards(layout)
    if not shards:
        raise FileNotFoundError(f"no aligned embeddings under {layout.aligned}: run embed (or reorder) first")
    ledger = Ledger(layout, STAGE)
    ledger.check_fingerprint(fingerprint(config), defaults=fingerprint(FilterConfig()),
                             remedy=f"set the filter section back, or delete {layout.filter}, "
                                                         f"{layout.ledger_dir(STAGE)}* and {layout.scratch(STAGE)} "
                                                         "to filter again")
    if not exists(layout.ledger_fingerprint(STAGE)):  # a fresh start: nothing of an earlier first pass is reused
        remove(layout.scratch(STAGE), recursive=True)
    ledger.keep_fingerprint(fingerprint(config))
    done = ledger.done()
    pending = [s for s in shards if s not in done]
    if config.distributor == "ray" and pending:
        session.connect(config.resources, "filter.resources")
    judged, clip_check = trusted_config(config, root, holdout if holdout is not None else Holdout([], [], [], []))
    first_pass_done = list_names(layout.scratch(STAGE), ".parquet")
    todo = [s for s in pending if s not in first_pass_done]
    _, failures = run_shards(ShardFilter(judged, root), todo, session=session, distributor=config.distributor,
                             num_cpus=config.cpus_per_task, desc="filter: shards", resources=config.resources)
    for shard, error in failures.items():
        ledger.fail(shard, rows=present_rows(layout, shard), error=error)
    if failures:
        log.error("filter: %d shards failed; nothing is searched across the run until they pass (re-run): %s",
                  len(failures), failures)
    elif pending:
        try:
            check_model_drops(judged, *model_drops(layout, [layout.scratch(STAGE, f"{s}.parquet") for s in pending], judged))
        except Exception:
            # nothing recorded yet: the next try starts afresh, under whatever settings it is given
            remove(layout.scratch(STAGE), recursive=True)
            if not done:
                remove(layout.ledger_fingerprint(STAGE))
            raise
        across_the_run(config, layout, ledger, [s for s in shards if s not in pending], pending)
        remove(layout.scratch(STAGE), recursive=True)
    return ledger.summarize(started, extra={"clip_check": clip_check})
