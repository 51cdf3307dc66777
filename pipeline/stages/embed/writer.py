"""The embed stage's writing side, off the driver.

    embedded rows --map_batches(write_parts, CPU tasks)--> <root>/_scratch/embed/{shard}/part_*.parquet
                  --> driver: one small row per part (shard, part, rows) or marker (shard end, shard failed)
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
from collections import Counter, defaultdict, deque

import numpy as np
import pyarrow as pa

from pipeline.run.config import EmbedConfig
from dalle2.faults import crash_point
from pipeline.run.layout import CAPTION, KEY, SHARD, RunLayout, parse_key, shard_id_of
from pipeline.run.ledger import Ledger, ShardRecord
from pipeline.run.storage import embedding_array, embedding_column, read_json, read_parquet, remove, write_parquet

log = logging.getLogger(__name__)

PART, ROWS, END, FAILURE, LOADED_AT = "part", "rows", "end", "failure", "loaded_at"
FIRST_AT, FIRST_ROWS, LAST_AT = "first_at", "first_rows", "last_at"  # a part's first CLIP batch: when, how many rows


def write_parts(batch: dict[str, np.ndarray], root: str, output_dtype: str) -> dict[str, np.ndarray]:
    """Ray Data task: this block's rows of each shard into one scratch part per shard; returns one row per part
    written and per marker (a shard's end, carrying the samples read, or its failure)."""
    from pipeline.stages.embed.stage import ERROR, SHARD_END, SHARD_FAILED, STAGE

    layout, dtype = RunLayout(root), np.dtype(output_dtype)
    out: dict[str, list] = {SHARD: [], PART: [], ROWS: [], END: [], FAILURE: [], FIRST_AT: [], FIRST_ROWS: [],
                            LAST_AT: [], LOADED_AT: []}
    times = np.asarray(batch["embedded_at"], dtype=np.float64)
    loaded_at = float(np.min(batch["loaded_at"])) if len(times) else 0.0

    def emit(shard: str, part: str = "", rows: int = 0, end: int = -1, failure: str = "", at=times) -> None:
        first = float(at.min())  # a CLIP batch's rows share one time: the rows at the minimum are one batch's
        values = (shard, part, rows, end, failure, first, int((at == first).sum()) if rows else 0, float(at.max()),
                  loaded_at)
        for column, value in zip(out, values):
            out[column].append(value)

    by_shard: dict[str, list[int]] = defaultdict(list)
    for i, (shard, error) in enumerate(zip(batch[SHARD].tolist(), batch[ERROR].tolist())):
        if error.startswith(SHARD_FAILED):
            emit(shard, failure=error[len(SHARD_FAILED):], at=times[i : i + 1])
        elif error.startswith(SHARD_END):
            emit(shard, end=int(error[len(SHARD_END):]), at=times[i : i + 1])
        else:
            by_shard[shard].append(i)
    for shard, rows in by_shard.items():
        rows_arr = np.asarray(rows)
        keys = [str(k) for k in batch[KEY][rows_arr]]
        table = pa.table({KEY: keys, CAPTION: [str(c) for c in batch[CAPTION][rows_arr]],
                          ERROR: [str(e) for e in batch[ERROR][rows_arr]],
                          "img_emb": embedding_column(batch["img_emb"][rows_arr].astype(dtype)),
                          "text_emb": embedding_column(batch["text_emb"][rows_arr].astype(dtype))})
        digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
        part = layout.scratch(STAGE, shard, f"part_{digest}_{len(keys)}.parquet")
        write_parquet(part, table)
        emit(shard, part=part, rows=len(keys), at=times[rows_arr])
    return {column: np.asarray(values) for column, values in out.items()}


def finish_shard(root: str, config: EmbedConfig, info, embed_dim: int, parts: list[str], started: float) -> ShardRecord:
    """Ray task: the shard's outputs from its parts, then its ledger record. Keys that do not name a slot of the
    shard, repeated keys and rows that failed upstream are counted by reason, never written."""
    from pipeline.formats.aligned import align, write_aligned
    from pipeline.stages.embed.stage import ERROR, STAGE, fingerprint
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
    img_emb = embedding_array(table.column("img_emb"), dtype)[good] if table is not None else np.zeros((0, embed_dim), dtype)
    text_emb = embedding_array(table.column("text_emb"), dtype)[good] if table is not None else np.zeros((0, embed_dim), dtype)
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


class ShardTracker:
    """The driver's side: counts each shard's rows as their parts arrive and starts its finish_shard task once
    the shard's end marker and all of its rows are in; holds names and counts only."""

    def __init__(self, root: str, infos: dict, config: EmbedConfig, embed_dim: int):
        import ray

        self.root, self.infos, self.config, self.embed_dim = root, infos, config, embed_dim
        self.parts: dict[str, list[str]] = defaultdict(list)
        self.rows: Counter = Counter()
        self.ends: dict[str, int] = {}
        self.failures: dict[str, str] = {}
        self.finishing: dict = {}  # ref -> shard
        self.waiting: deque = deque()  # shards complete (their parts in self.parts), for a finish task once one is free
        self.submitted: set[str] = set()
        self.finished: set[str] = set()
        self.started = {name: time.time() for name in infos}
        # when CLIP's first rows came out, how many came then, and the rows and the last time of all (running
        # figures: the driver keeps nothing per part)
        self.first_at, self.rows_at_first, self.rows_total, self.last_at = float("inf"), 0, 0, 0.0
        self.loaded_at = float("inf")  # when the first CLIP actor had its model loaded
        from pipeline.execution.console import progress_bar

        self.progress = progress_bar(total=len(infos), desc="embed", unit="shard")  # shards written or failed
        self.remote = ray.remote(finish_shard).options(num_cpus=config.decode_cpus, max_retries=2,
                                                       retry_exceptions=True, resources=config.resources)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.loaded_at = min(self.loaded_at, float(np.min(batch[LOADED_AT]))) if len(batch[LOADED_AT]) else self.loaded_at
        for shard, part, rows, end, failure, first, first_rows, last in zip(*(
                batch[c].tolist() for c in (SHARD, PART, ROWS, END, FAILURE, FIRST_AT, FIRST_ROWS, LAST_AT))):
            if shard in self.submitted:  # a replayed row of a shard whose outputs are being written: nothing new
                continue
            if failure:
                self.failures[shard] = failure
                log.error("embed: shard %s failed: %s", shard, failure)
                continue
            if end >= 0:
                self.ends[shard] = end
            else:
                self.parts[shard].append(part)
                self.rows[shard] += rows
                self.time_rows(first, first_rows, last, rows)
            if shard not in self.failures and self.ends.get(shard) == self.rows[shard]:
                self.submit(shard)
        self.collect(timeout=0)

    def advance(self) -> None:
        """Move the progress bar to the shards that have ended, written or failed."""
        ended = len(self.finished | set(self.failures))
        if ended > self.progress.n:
            self.progress.update(ended - self.progress.n)

    def time_rows(self, first: float, first_rows: int, last: float, rows: int) -> None:
        if first < self.first_at:
            self.first_at, self.rows_at_first = first, first_rows
        elif first == self.first_at:
            self.rows_at_first += first_rows
        self.rows_total, self.last_at = self.rows_total + rows, max(self.last_at, last)

    def submit(self, shard: str) -> None:
        self.submitted.add(shard)
        info, read = self.infos[shard], self.ends[shard]
        if info.expected is not None and read != info.expected:
            self.failures[shard] = f"tar {info.tar} holds {read} samples, its parquet lists {info.expected}"
            return
        self.waiting.append(shard)
        self.start_waiting()

    def start_waiting(self) -> None:
        """Start finish tasks for waiting shards, up to `write_concurrency` at once."""
        while self.waiting and len(self.finishing) < self.config.write_concurrency:
            shard = self.waiting.popleft()
            ref = self.remote.remote(self.root, self.config, self.infos[shard], self.embed_dim, self.parts.pop(shard, []),
                                     self.started[shard])
            self.finishing[ref] = shard
            crash_point("embed.after_submit")  # the driver lost with shards being written and parts in scratch

    def collect(self, timeout: float | None) -> None:
        """Take the records of finished shards and start waiting ones (waiting up to `timeout`; None: until all
        are done)."""
        import ray

        while self.finishing:
            ready = len(self.finishing) if timeout is not None else 1  # blocking: on as soon as one is done
            done, _ = ray.wait(list(self.finishing), num_returns=ready, timeout=timeout)
            for ref in done:
                shard = self.finishing.pop(ref)
                try:
                    ray.get(ref)
                    self.finished.add(shard)
                except Exception as error:  # noqa: BLE001 - e.g. a write error: this shard fails, with its reason
                    cause = getattr(error, "cause", None) or error
                    self.failures[shard] = f"{type(cause).__name__}: {cause}"
                    log.error("embed: shard %s failed: %s", shard, self.failures[shard])
            self.start_waiting()
            self.advance()
            if timeout is not None:
                return
        self.advance()

    def close(self) -> dict[str, str]:
        """Wait for the shards being written; fail those whose samples did not all arrive; {shard: error}."""
        self.collect(timeout=None)
        for shard, info in self.infos.items():
            if shard not in self.finished and shard not in self.failures:
                self.failures[shard] = f"only {self.rows[shard]} of {self.ends.get(shard, '?')} samples of {info.tar} came back"
        self.advance()
        self.progress.close()
        return self.failures

    def steady_timing(self, started: float, marks: dict[str, float]) -> dict:
        """Startup (command start to CLIP's first embeddings), broken into its steps (`marks`: the times planning
        and Ray's start ended; then the first CLIP actor's model loaded, then its first batch out), and the rate
        after it, which is what a long run sees; small runs are dominated by the startup."""
        if not self.rows_total:
            return {}
        later, span = self.rows_total - self.rows_at_first, self.last_at - self.first_at
        steps, previous = {}, started
        for name, at in (*marks.items(), ("model_load_s", self.loaded_at), ("first_batch_s", self.first_at)):
            steps[name], previous = round(max(0.0, at - previous), 2), at
        timing = {"startup_s": round(self.first_at - started, 2), "startup_steps": steps}
        if later:
            timing["steady_rows_per_s"] = round(later / span, 1) if span > 0 else None
        return timing
