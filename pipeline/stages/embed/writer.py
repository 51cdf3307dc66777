"""The embed stage's writing side, off the driver.

    embedded rows --map_batches(write_parts, CPU tasks)--> <root>/_scratch/embed/{shard}/part_*.parquet
                  --> driver: one PartRow per part (shard, part, rows), and each shard's END or FAILED row
    all of a shard's rows in parts --> a Ray task (finish_shard): the shard's clip-retrieval files, its
                  aligned files, then its ledger record; its parts are removed

The driver holds part names and row counts, never an embedding, and writes no output file. A part's name
is a hash of its keys, so a write task retried after its node died rewrites the same part instead of
adding a second copy of its rows.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa

from dalle2.faults import crash_point
from pipeline.run.config import EmbedConfig
from pipeline.run.layout import EMBED, RunLayout, parse_key, shard_id_of
from pipeline.run.ledger import Ledger, ShardRecord
from pipeline.run.storage import embedding_array, embedding_column, read_json, read_parquet, remove, write_parquet
from pipeline.stages.embed.rows import (CAPTION, COUNT, EMBEDDED_AT, END, ERROR, FAILED, IMG_EMB, KEY, KIND, LOADED_AT,
                                        SAMPLE, SHARD, TEXT_EMB, PartRow, part_batch)

log = logging.getLogger(__name__)

STAGE = EMBED


def fingerprint(config: EmbedConfig) -> dict:
    """What a run's embeddings are made with: the CLIP (a trained checkpoint's path included) and the dtype."""
    return {"clip": config.clip.model_dump(mode="json"), "output_dtype": config.output_dtype}


def write_parts(batch: dict[str, np.ndarray], root: str, output_dtype: str) -> dict[str, np.ndarray]:
    """Ray Data task: this block's samples of each shard into one scratch part per shard; returns the part
    stream's rows: one per part written, and each END and FAILED row passed on."""
    layout, dtype = RunLayout(root), np.dtype(output_dtype)
    out: list[PartRow] = []
    times = np.asarray(batch[EMBEDDED_AT], dtype=np.float64)
    loaded_at = float(np.min(batch[LOADED_AT])) if len(times) else 0.0

    def timed(at: np.ndarray, rows: int) -> dict:
        first = float(at.min())  # a CLIP batch's rows share one time: the rows at the minimum are one batch's
        return dict(first_at=first, first_rows=int((at == first).sum()) if rows else 0, last_at=float(at.max()),
                    loaded_at=loaded_at)

    by_shard: dict[str, list[int]] = defaultdict(list)
    for i, (shard, kind) in enumerate(zip(batch[SHARD].tolist(), batch[KIND].tolist())):
        if kind == SAMPLE:
            by_shard[shard].append(i)
        elif kind == END:
            out.append(PartRow(shard, END, count=int(batch[COUNT][i]), **timed(times[i : i + 1], 0)))
        else:
            out.append(PartRow(shard, FAILED, error=str(batch[ERROR][i]), **timed(times[i : i + 1], 0)))
    for shard, rows in by_shard.items():
        rows_arr = np.asarray(rows)
        keys = [str(k) for k in batch[KEY][rows_arr]]
        table = pa.table({KEY: keys, CAPTION: [str(c) for c in batch[CAPTION][rows_arr]],
                          ERROR: [str(e) for e in batch[ERROR][rows_arr]],
                          IMG_EMB: embedding_column(batch[IMG_EMB][rows_arr].astype(dtype)),
                          TEXT_EMB: embedding_column(batch[TEXT_EMB][rows_arr].astype(dtype))})
        digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
        part = layout.scratch(STAGE, shard, f"part_{digest}_{len(keys)}.parquet")
        write_parquet(part, table)
        out.append(PartRow(shard, SAMPLE, part=part, rows=len(keys), **timed(times[rows_arr], len(keys))))
    return part_batch(out)


def finish_shard(root: str, config: EmbedConfig, info, embed_dim: int, parts: list[str], started: float) -> ShardRecord:
    """Ray task: the shard's outputs from its parts, then its ledger record. Keys that do not name a slot of the
    shard, repeated keys and rows that failed upstream are counted by reason, never written."""
    from pipeline.formats.aligned import align, write_aligned
    from pipeline.run.storage import write_npy

    layout, shard, dtype = RunLayout(root), info.name, np.dtype(config.output_dtype)
    ledger = Ledger(layout, STAGE)
    if ledger.is_done(shard):  # a retry of a task that recorded the shard and died removing its parts
        remove(layout.scratch(STAGE, shard), recursive=True)
        return ShardRecord(**read_json(layout.ledger_record(STAGE, shard)))
    tables = [read_parquet(part) for part in parts]
    table = pa.concat_tables(tables) if tables else None
    keys = table.column(KEY).to_pylist() if table is not None else []
    captions = table.column(CAPTION).to_pylist() if table is not None else []
    errors = table.column(ERROR).to_pylist() if table is not None else []
    order = sorted(range(len(keys)), key=keys.__getitem__)
    index_digits = info.index_digits or (len(keys[order[0]]) - len(shard) if keys else 1)
    indices = np.full(len(keys), -1, dtype=np.int64)
    seen: set[int] = set()
    for row in order:
        if errors[row]:
            continue
        try:
            shard_id, index = parse_key(keys[row], index_digits)
        except ValueError:
            errors[row] = "unparsable key"
            continue
        if shard_id != shard_id_of(shard) or (info.slots is not None and index >= info.slots):
            errors[row] = "key outside the shard"
        elif index in seen:
            errors[row] = "duplicate key"
        else:
            indices[row] = index
        seen.add(index)
    good = np.asarray([row for row in order if not errors[row]], dtype=np.int64)
    img_emb = embedding_array(table.column(IMG_EMB), dtype)[good] if table is not None else np.zeros((0, embed_dim), dtype)
    text_emb = embedding_array(table.column(TEXT_EMB), dtype)[good] if table is not None else np.zeros((0, embed_dim), dtype)
    good_keys, good_captions = [keys[row] for row in good], [captions[row] for row in good]
    ledger.keep_fingerprint(fingerprint(config))
    if config.write_clip_retrieval:
        files = layout.clip_retrieval_files(shard_id_of(shard))
        write_npy(files["img_emb"], img_emb)
        write_npy(files["text_emb"], text_emb)
        write_parquet(files["metadata"], pa.table({KEY: pa.array(good_keys, pa.string()),
                                                   CAPTION: pa.array(good_captions, pa.string())}))
    crash_point("embed.between_files")
    slots = info.slots if info.slots is not None else (int(indices[good].max()) + 1 if len(good) else 0)
    aligned = align(shard_id_of(shard), slots, len(shard), index_digits, indices[good], img_emb, text_emb, good_captions)
    write_aligned(layout, shard, aligned)
    crash_point("embed.after_outputs")
    failed = Counter(error for error in errors if error)
    for row in order:
        if errors[row]:
            log.warning("embed: skipped %s in shard %s: %s", keys[row], shard, errors[row])
    record = ShardRecord(shard, len(keys), len(good), dict(failed), round(time.time() - started, 3))
    ledger.record(record)
    remove(layout.scratch(STAGE, shard), recursive=True)
    return record
