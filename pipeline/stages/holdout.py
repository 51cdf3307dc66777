"""The run's held-out rows: one split, fixed before any training, that no training stage reads.

CLIP, the prior and the decoder all train on the run's rows; their evaluations (and the demo's prompts, the
R-precision caption pool and the filter's check of its CLIP) draw from rows none of them saw. The split is drawn
once, from the downloaded rows (or the aligned ones where the run has no shards of its own), at random from a few
shards (`holdout.max_shards`) so that planning an epoch reads the row lists of those shards alone, and written to
`<root>/holdout.parquet` (shard, index, key, caption). Later runs read it; a config that would draw another split
is refused rather than letting training see rows an earlier evaluation held out.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from pipeline.formats.holdout import SETTINGS, Holdout, read_holdout
from pipeline.run.config import HoldoutConfig
from pipeline.run.layout import CAPTION, INDEX, KEY, SHARD, RunLayout

log = logging.getLogger(__name__)


def candidate_rows(root: str, shard: str, kind: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(row indices, keys, captions) of the usable rows of one shard: downloaded successes, or present aligned rows."""
    from pipeline.formats.queries import usable_rows

    return usable_rows(RunLayout(root), shard, kind)


def draw_holdout(root: str, config: HoldoutConfig) -> Holdout:
    """Draw the split from the run's rows (deterministic in `config.seed` and the run's shards)."""
    from pipeline.formats.aligned import aligned_shards
    from pipeline.formats.queries import complete_shards
    from pipeline.loaders.plan import planned_counts

    layout = RunLayout(root)
    shards, kind = complete_shards(layout), "downloaded"
    if not shards:
        shards, kind = aligned_shards(layout), "aligned"
    if not shards:
        raise FileNotFoundError(f"no downloaded shards under {layout.shards} nor aligned embeddings under "
                                f"{layout.aligned} to hold rows out of: run download first")
    counts = planned_counts(root, kind, shards)
    total = sum(counts.values())
    wanted = min(config.rows, int(config.max_fraction * total))
    if config.rows and total >= 4:
        wanted = min(max(wanted, 2), total // 2)  # an evaluation needs two rows; training keeps at least half
    rng = np.random.default_rng(config.seed)
    with_rows = [s for s in shards if counts[s]]
    chosen = sorted(rng.choice(len(with_rows), size=min(config.max_shards, len(with_rows)), replace=False).tolist())
    pool = [(with_rows[j], *row) for j in chosen for row in zip(*candidate_rows(root, with_rows[j], kind))]
    picked = sorted(rng.choice(len(pool), size=min(wanted, len(pool)), replace=False).tolist()) if wanted else []
    rows = [pool[p] for p in picked]
    return Holdout([r[0] for r in rows], [int(r[1]) for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def write_holdout(root: str, holdout: Holdout, config: HoldoutConfig) -> None:
    """Write the split with the settings it was drawn with."""
    from pipeline.run.storage import write_parquet

    table = pa.table({SHARD: pa.array(holdout.shards, pa.string()), INDEX: pa.array(holdout.indices, pa.int64()),
                      KEY: pa.array(holdout.keys, pa.string()), CAPTION: pa.array(holdout.captions, pa.string())})
    write_parquet(RunLayout(root).holdout, table.replace_schema_metadata({SETTINGS: json.dumps(settings(config))}))


def settings(config: HoldoutConfig) -> dict:
    return config.model_dump(mode="json")


def ensure_holdout(root: str, config: HoldoutConfig, trained: tuple[str, ...] = ()) -> Holdout:
    """The run's split: drawn and written on the first call, read afterwards; refused naming the settings when the
    config asks for another one than the split training already left out. `trained`: the run's training jobs that
    already ran (a run from before splits existed), said when the split is drawn after them."""
    found = read_holdout(root)
    if found is not None:
        holdout, drawn_with = found
        if drawn_with and drawn_with != settings(config):
            changed = sorted(k for k in set(drawn_with) | set(settings(config)) if drawn_with.get(k) != settings(config).get(k))
            from pipeline.run.ledger import StaleRunError

            raise StaleRunError(f"holdout: {RunLayout(root).holdout} was drawn with "
                             + ", ".join(f"holdout.{k}={drawn_with.get(k)}" for k in changed)
                             + " but the config says " + ", ".join(f"{k}={settings(config).get(k)}" for k in changed)
                             + ": set them back (training already left those rows out), or start a new root for "
                             "another split")
        return holdout
    holdout = draw_holdout(root, config)
    write_holdout(root, holdout, config)
    if trained:
        log.warning("holdout: drawn after %s trained on every row (a run from before held-out splits): their "
                    "evaluations on these rows are not on unseen data; a new root gives a clean split", ", ".join(trained))
    log.info("holdout: %d rows of %d shards held out of every training stage (%s)", len(holdout),
             len(set(holdout.shards)), RunLayout(root).holdout)
    return holdout
