"""What a run's stages wrote, read back: the read-side queries stages and loaders share (no stage imports another).

Which shards finished downloading, what a shard holds, its usable rows (downloaded or aligned), the key width, the
URL list's skipped rows, the rows the filter kept. Each reads files whose names come from pipeline/run/layout.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.run.layout import CAPTION, DOWNLOAD, INDEX, KEEP, KEY, PRESENT, RunLayout, parse_key
from pipeline.run.ledger import Ledger
from pipeline.run.storage import exists, list_names, read_json, read_parquet

LOST_IN_IMG2DATASET = "lost inside img2dataset (see worker log)"  # a row img2dataset skipped without a parquet row


@dataclass
class ShardInfo:
    """What the download stage says a shard holds."""

    name: str
    tar: str
    expected: Optional[int]  # samples in the tar (successes in its parquet); None if unknown
    slots: Optional[int]  # rows of the shard's parquet (its aligned length); None if unknown
    index_digits: Optional[int]  # digits of the in-shard index of its keys; None if unknown


def complete_shards(layout: RunLayout) -> list[str]:
    """Shards whose download finished: recorded in the download ledger when the run has one (a shard whose
    download died after img2dataset's stats file is downloaded again, so it is not final yet), else, for
    plain img2dataset output, those with img2dataset's stats file (written last)."""
    stats = sorted(list_names(layout.shards, layout.STATS))
    recorded = Ledger(layout, DOWNLOAD).done()
    return [shard for shard in stats if shard in recorded] if recorded else stats


def shard_info(layout: RunLayout, name: str, index_digits: Optional[int]) -> ShardInfo:
    """What the shard's parquet says; the key width from the download config (`index_digits`), else from the
    parquet's keys (img2dataset keys every row, failed ones too), never from the samples that made it."""
    expected = slots = None
    if exists(layout.shard_parquet(name)):
        table = read_parquet(layout.shard_parquet(name), columns=["key", "status"]).to_pydict()
        expected, slots = sum(s == "success" for s in table["status"]), len(table["status"])
        if index_digits is None and table["key"]:
            index_digits = len(table["key"][0]) - len(name)
    return ShardInfo(name, layout.shard_tar(name), expected, slots, index_digits)


def run_index_width(layout: RunLayout) -> Optional[int]:
    """The key width this run's download stage used (its summary says), or None for shards made elsewhere."""
    summary = layout.ledger_summary(DOWNLOAD)
    return read_json(summary).get("index_width") if exists(summary) else None


def written_per_shard(layout: RunLayout, stage: str) -> dict[str, int]:
    """{shard: rows written} as the stage's ledger summary counts them (one read; {} before it has one)."""
    summary = layout.ledger_summary(stage)
    per_shard = (read_json(summary).get("per_shard") or {}) if exists(summary) else {}
    return {shard: record["written"] for shard, record in per_shard.items()}


def skipped_rows(layout: RunLayout) -> dict[str, int]:
    """Rows of the URL list the split skipped (download.skip_malformed_rows), by reason."""
    marker = layout.split_marker
    return dict(read_json(marker).get("input_rows_skipped") or {}) if exists(marker) else {}


def kept_indices(root: str, shard: str) -> np.ndarray:
    """The aligned row indices of `shard` the filter kept; FileNotFoundError naming the mask if it has not run."""
    path = RunLayout(root).filter_mask(shard)
    if not exists(path):
        raise FileNotFoundError(f"no filter mask {path}: run the filter stage (dalle2 filter), or set filter.enabled: false")
    mask = read_parquet(path, columns=[INDEX, KEEP]).to_pydict()
    return np.asarray([i for i, keep in zip(mask[INDEX], mask[KEEP]) if keep], dtype=np.int64)


def usable_rows(layout: RunLayout, shard: str, kind: str, captions: bool = True) -> tuple[np.ndarray, list[str], list[str]]:
    """(row indices ascending, keys, captions) of a shard's usable rows: its downloaded successes ("downloaded", from
    the shard's parquet; the key width from its keys) or its present aligned rows ("aligned"). Without `captions`,
    no caption column is read and the captions are empty."""
    if kind == "downloaded":
        columns = ["key", "status"] + ([CAPTION] if captions else [])
        table = read_parquet(layout.shard_parquet(shard), columns=columns).to_pydict()
        digits = len(table["key"][0]) - len(shard) if table["key"] else 1
        texts = table[CAPTION] if captions else [""] * len(table["key"])
        rows = [(parse_key(k, digits)[1], k, c or "") for k, s, c in zip(table["key"], table["status"], texts)
                if s == "success"]
    else:
        columns = [INDEX, KEY, PRESENT] + ([CAPTION] if captions else [])
        table = read_parquet(layout.aligned_files(shard)["metadata"], columns=columns).to_pydict()
        texts = table[CAPTION] if captions else [""] * len(table[INDEX])
        rows = [(i, k, c or "") for i, k, c, p in zip(table[INDEX], table[KEY], texts, table[PRESENT]) if p]
    rows.sort()
    return (np.asarray([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows], [r[2] for r in rows])


def usable_indices(layout: RunLayout, shard: str, kind: str) -> np.ndarray:
    """A shard's usable row indices, ascending ("downloaded" or "aligned", as `usable_rows`), read with as few
    columns as that takes: training plans read them for every shard of its slice."""
    if kind == "aligned":  # the aligned metadata is in index order: no keys to parse or sort
        meta = read_parquet(layout.aligned_files(shard)["metadata"], columns=[INDEX, PRESENT])
        return meta.column(INDEX).to_numpy()[meta.column(PRESENT).to_numpy(zero_copy_only=False)].astype(np.int64)
    return usable_rows(layout, shard, kind, captions=False)[0]
