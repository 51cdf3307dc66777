"""The reorder stage: clip-retrieval embeddings (rows in any order, identified by key) -> aligned layout.

Two passes of Ray tasks, so no node ever holds all the embeddings:
  1. split: one task per input part reads its keys and embeddings and writes, for every shard it
     touches, a scratch file of (index, embeddings, caption);
  2. gather: one task per shard reads its scratch files and writes the aligned files and its ledger record.
Both passes are resumable: a part's split writes a done marker, a shard's ledger record is its marker.
No shard is gathered until every part is split: a shard may have rows in any part, so gathering it
while a part failed would mark it done without those rows.

Part files are taken as they are listed (clip-retrieval zero-pads part numbers once there are ten or
more: metadata_00.parquet goes with img_emb_00.npy); their names are never rebuilt from a number.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Optional

import numpy as np
import pyarrow as pa

from dalle2.faults import crash_point
from pipeline.execution.distributor import run_shards
from pipeline.execution.session import RaySession, require_session
from pipeline.formats.aligned import align, write_aligned
from pipeline.run.config import ReorderConfig
from pipeline.run.layout import CAPTION, INDEX, KEY, REORDER, RunLayout, parse_key, shard_id_of, shard_name
from pipeline.run.ledger import Ledger, ShardRecord
from pipeline.run.storage import (embedding_array, embedding_column, exists, list_files, list_names, read_many_json, read_npy,
                      read_parquet, remove, write_json, write_parquet)

log = logging.getLogger(__name__)

STAGE = REORDER


class Reorder:
    """Both passes of the stage; each call handles one part (split) or one shard (gather)."""

    def __init__(self, config: ReorderConfig, root: str, index_digits: int, shard_digits: int):
        self.config, self.layout = config, RunLayout(root)
        self.source = (config.source or self.layout.embeddings).rstrip("/")
        self.index_digits, self.shard_digits = index_digits, shard_digits

    def part_files(self, part: str) -> dict[str, str]:
        """The three files of the part whose metadata file is metadata_{part}.parquet (part as listed)."""
        return {"img_emb": f"{self.source}/img_emb/img_emb_{part}.npy",
                "text_emb": f"{self.source}/text_emb/text_emb_{part}.npy",
                "metadata": f"{self.source}/metadata/metadata_{part}.parquet"}

    def split(self, part: str) -> ShardRecord:
        """Pass 1 on input part `part`: scatter its rows into per-shard scratch files."""
        files = self.part_files(part)
        meta = read_parquet(files["metadata"])
        if KEY not in meta.column_names:
            raise ValueError(f"{files['metadata']}: no '{KEY}' column (has {meta.column_names})")
        keys = meta.column(KEY).to_pylist()
        captions = meta.column(CAPTION).to_pylist() if CAPTION in meta.column_names else [""] * len(keys)
        img_emb = read_npy(files["img_emb"])
        text_emb = read_npy(files["text_emb"]) if exists(files["text_emb"]) else None
        for name, array in (("img_emb", img_emb), ("text_emb", text_emb)):
            if array is not None and len(array) != len(keys):
                raise ValueError(f"{files[name]} has {len(array)} rows but {files['metadata']} has {len(keys)}")
        finite = np.isfinite(img_emb).all(axis=1)
        if text_emb is not None:
            finite &= np.isfinite(text_emb).all(axis=1)
        by_shard: dict[int, list[int]] = {}
        unplaced: Counter = Counter()
        indices = np.zeros(len(keys), dtype=np.int64)
        for row, key in enumerate(keys):
            try:
                shard_id, indices[row] = parse_key(str(key), self.index_digits)
            except ValueError:
                unplaced["malformed key"] += 1
                continue
            if not finite[row]:  # NaN / inf would poison training; float16 would keep them
                unplaced["non-finite embedding"] += 1
                continue
            by_shard.setdefault(shard_id, []).append(row)
        for shard_id, rows in by_shard.items():
            rows_arr = np.asarray(rows)
            columns = {INDEX: pa.array(indices[rows_arr]), CAPTION: pa.array([str(captions[r] or "") for r in rows]),
                       "img_emb": embedding_column(img_emb[rows_arr])}
            if text_emb is not None:
                columns["text_emb"] = embedding_column(text_emb[rows_arr])
            name = shard_name(shard_id, self.shard_digits)
            write_parquet(self.layout.scratch(STAGE, name, f"part_{part}.parquet"), pa.table(columns))
            crash_point("reorder.mid_split")
        record = ShardRecord(f"part-{part}", len(keys), len(keys) - sum(unplaced.values()), dict(unplaced))
        write_json(self.layout.scratch(STAGE, "_parts", f"{part}.json"),
                   {"shards": sorted(shard_name(s, self.shard_digits) for s in by_shard), "record": record.__dict__})
        return record

    def gather(self, shard: str) -> ShardRecord:
        """Pass 2 on `shard`: collect its scratch files into the aligned layout."""
        start = time.time()
        tables = [read_parquet(url) for url in list_files(self.layout.scratch(STAGE, shard), ".parquet")]
        table = pa.concat_tables(tables) if tables else None
        indices = table.column(INDEX).to_numpy() if table is not None else np.zeros(0, np.int64)
        # The first row of an index wins; later duplicates are counted, not silently merged.
        _, first = np.unique(indices, return_index=True)
        first = np.sort(first)
        duplicates = len(indices) - len(first)
        slots = self.slots(shard, indices)
        img_emb = embedding_array(table.column("img_emb"), np.float16)[first] if table is not None else np.zeros((0, 1), np.float16)
        text_emb = None
        if table is not None and "text_emb" in table.column_names:
            text_emb = embedding_array(table.column("text_emb"), np.float16)[first]
        captions = [table.column(CAPTION)[int(i)].as_py() for i in first] if table is not None else []
        aligned = align(shard_id_of(shard), slots, self.shard_digits, self.index_digits, indices[first], img_emb,
                        text_emb, captions)
        write_aligned(self.layout, shard, aligned)
        crash_point("reorder.after_outputs")
        record = ShardRecord(shard, len(indices), len(first), {"duplicate key": duplicates} if duplicates else {},
                             round(time.time() - start, 3))
        Ledger(self.layout, STAGE).record(record)
        return record

    def slots(self, shard: str, indices: np.ndarray) -> int:
        """Rows of the shard's aligned files: configured, else its download parquet's rows, else max index + 1."""
        if self.config.samples_per_shard:
            return self.config.samples_per_shard
        if exists(self.layout.shard_parquet(shard)):
            return read_parquet(self.layout.shard_parquet(shard), columns=["key"]).num_rows
        return int(indices.max()) + 1 if len(indices) else 0


def infer_widths(config: ReorderConfig, layout: RunLayout, source: str) -> tuple[int, int]:
    """(index digits, shard-name digits): configured, else the download stage's, else from the run's shard
    names and the first key."""
    tars = list_files(layout.shards, ".tar")
    shard_digits = len(tars[0].rsplit("/", 1)[-1][: -len(".tar")]) if tars else 5
    if config.index_width:
        return config.index_width, shard_digits
    from pipeline.formats.queries import run_index_width

    width = run_index_width(layout)  # the width the shards were keyed with
    if width:
        return int(width), shard_digits
    metas = list_files(f"{source}/metadata", ".parquet")
    if not tars or not metas:
        raise ValueError("reorder.index_width is not set and cannot be inferred (needs <root>/shards/*.tar and "
                         f"{source}/metadata/*.parquet): set reorder.index_width")
    key = read_parquet(metas[0], columns=[KEY]).column(KEY)[0].as_py()
    return len(key) - shard_digits, shard_digits


def source_parts(source: str) -> list[str]:
    """The clip-retrieval parts under `source`, as listed: metadata_00.parquet -> "00" (never int("00") -> "0")."""
    return [url.rsplit("/", 1)[-1][len("metadata_"):-len(".parquet")]
            for url in list_files(f"{source}/metadata", ".parquet") if url.rsplit("/", 1)[-1].startswith("metadata_")]


def parts_to_split(layout: RunLayout, parts: list[str]) -> list[str]:
    """The parts whose split has not finished (no marker)."""
    split = list_names(layout.scratch(STAGE, "_parts"), ".json")
    return [p for p in parts if p not in split]


def split_markers(layout: RunLayout, parts: list[str]) -> list[dict]:
    """The split markers of `parts` (read concurrently): the shards each touched and its record."""
    urls = [layout.scratch(STAGE, "_parts", f"{p}.json") for p in parts]
    found = read_many_json(urls)
    return [found[url] for url in urls]


def shards_to_gather(layout: RunLayout, markers: list[dict]) -> list[str]:
    """The shards the split parts touched that are not gathered yet, in order."""
    done = Ledger(layout, STAGE).done()
    return [s for s in sorted({s for m in markers for s in m["shards"]}) if s not in done]


def run_reorder(config: ReorderConfig, root: str, session: RaySession, distributor: Optional[str] = None) -> dict:
    """Write the aligned layout from clip-retrieval embeddings; returns the stage summary."""
    require_session(session, "run_reorder")
    started = time.time()
    distributor = distributor or config.distributor
    layout = RunLayout(root)
    source = (config.source or layout.embeddings).rstrip("/")
    parts = source_parts(source)
    if not parts:
        raise FileNotFoundError(f"no clip-retrieval metadata (metadata_*.parquet) under {source}/metadata")
    index_digits, shard_digits = infer_widths(config, layout, source)
    ledger = Ledger(layout, STAGE)
    reorder_fingerprint = {"source": source, "index_digits": index_digits, "shard_digits": shard_digits,
                           "samples_per_shard": config.samples_per_shard}
    ledger.check_fingerprint(reorder_fingerprint,
                             remedy=f"set reorder.source / index_width / samples_per_shard back, or delete "
                                    f"{layout.aligned} and {layout.ledger_dir(STAGE)}* to reorder again")
    stage = Reorder(config, root, index_digits, shard_digits)
    for name in ledger.failures():  # a part that failed before and is no longer in the source
        if name.startswith("part-") and name[len("part-"):] not in parts:
            ledger.clear_failure(name)
    if distributor == "ray":
        session.connect(config.resources, "reorder.resources")
    todo = parts_to_split(layout, parts)
    _, split_failures = run_shards(stage.split, todo, session=session, distributor=distributor, num_cpus=config.cpus_per_task, desc="reorder: split",
                                   resources=config.resources)
    for part, error in split_failures.items():
        ledger.fail(f"part-{part}", rows=part_rows(stage.part_files(part)["metadata"]), error=error)
    failed_before = ledger.failures()  # one listing, not a request per part
    for part in todo:
        if part not in split_failures and f"part-{part}" in failed_before:
            ledger.clear_failure(f"part-{part}")
    markers = split_markers(layout, [p for p in parts if p not in split_failures])
    crash_point("reorder.after_split")
    ledger.keep_fingerprint(reorder_fingerprint)
    gather_failures: dict[str, str] = {}
    if split_failures:  # a shard may have rows in a failed part: gather nothing until every part is split
        log.error("reorder: %d parts failed to split; no shard is gathered until they do (re-run to retry): %s",
                  len(split_failures), split_failures)
    else:
        pending = shards_to_gather(layout, markers)
        _, gather_failures = run_shards(stage.gather, pending, session=session, distributor=distributor,
                                        num_cpus=config.cpus_per_task, desc="reorder: gather",
                                        resources=config.resources)
        for shard, error in gather_failures.items():
            ledger.fail(shard, rows=scratch_rows(layout, shard), error=error)
        if not gather_failures:
            remove(layout.scratch(STAGE), recursive=True)
    unplaced = Counter()
    for m in markers:
        unplaced.update(m["record"]["failed"])
    summary = ledger.summarize(started, {"input_parts": len(parts),
                                         "input_rows": sum(m["record"]["rows_in"] for m in markers),
                                         "unplaced_rows_by_reason": dict(unplaced)})
    return summary


def scratch_rows(layout: RunLayout, shard: str) -> int:
    """Rows split into a shard's scratch files (what its failed gather leaves unplaced)."""
    return sum(part_rows(url) for url in list_files(layout.scratch(STAGE, shard), ".parquet"))


def part_rows(metadata_url: str) -> int:
    """Rows of a parquet file, from its footer (0 if it cannot be read)."""
    try:
        import pyarrow.parquet as pq

        from pipeline.run.storage import filesystem

        fs, path = filesystem(metadata_url)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:  # noqa: BLE001 - the part's error is recorded anyway
        return 0
