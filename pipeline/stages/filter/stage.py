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
from collections import Counter
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.formats.aligned import aligned_shards, read_aligned
from pipeline.run.config import FilterConfig, RayConfig
from pipeline.execution.distributor import ensure_ray, run_shards
from dalle2.faults import crash_point
from pipeline.run.layout import DUPLICATE_OF, FILTER, INDEX, KEEP, KEY, PRESENT, REASON, SIMILARITY, RunLayout
from pipeline.run.ledger import Ledger, ShardRecord
from pipeline.run.storage import exists, list_names, read_parquet, remove, write_parquet

log = logging.getLogger(__name__)

STAGE = FILTER
NEAR_DUPLICATE = "near duplicate"


def low_similarity(threshold: float) -> str:
    return f"clip similarity below {threshold:g}"


def low_rank(rank: int) -> str:
    return f"caption not in the image's top {rank}"


def caption_ranks(image: np.ndarray, text: np.ndarray, captions: list[str], rows: np.ndarray, block: int = 1024) -> np.ndarray:
    """For each of `rows`: where its own caption ranks (1 = first) among the shard's distinct captions by CLIP
    similarity with its image. Scale-free, so it works for a CLIP trained from scratch, whose cosines are
    compressed into a narrow band where an absolute threshold cannot tell a wrong caption from a right one."""
    first_row: dict[str, int] = {}
    for i in rows.tolist():
        first_row.setdefault(captions[i], i)
    distinct = list(first_row)
    column = {caption: j for j, caption in enumerate(distinct)}
    candidates = text[[first_row[c] for c in distinct]]
    ranks = np.zeros(len(rows), dtype=np.int64)
    for start in range(0, len(rows), block):
        chunk = rows[start : start + block]
        similarities = image[chunk] @ candidates.T
        own = similarities[np.arange(len(chunk)), [column[captions[i]] for i in chunk.tolist()]]
        ranks[start : start + block] = (similarities > own[:, None]).sum(axis=1) + 1
    return ranks


class ShardFilter:
    """Pass 1 for one shard: caption rules, CLIP similarity, duplicates inside the shard; a scratch mask."""

    def __init__(self, config: FilterConfig, root: str):
        self.config, self.layout = config, RunLayout(root)

    def __call__(self, shard: str) -> ShardRecord:
        started = time.time()
        aligned = read_aligned(self.layout, shard, mmap=False)
        rows = len(aligned.keys)
        reasons: list[Optional[str]] = [None if present else "absent" for present in aligned.present]
        for i, caption in enumerate(aligned.captions):
            if reasons[i] is None:
                reasons[i] = self.caption_reason(caption)
        image = normalized(aligned.img_emb)
        text = normalized(aligned.text_emb) if aligned.text_emb is not None else None
        similarity = (image * text).sum(axis=1) if text is not None else np.full(rows, np.nan, dtype=np.float32)
        for field in ("min_similarity", "max_caption_rank"):
            if getattr(self.config, field) is not None and text is None:
                raise ValueError(f"filter.{field} is set but shard {shard} has no text embeddings")

        def undecided() -> np.ndarray:
            return np.asarray([i for i in range(rows) if reasons[i] is None], dtype=np.int64)

        if self.config.min_similarity is not None:
            for i in np.nonzero(similarity < self.config.min_similarity)[0]:
                reasons[i] = reasons[i] or low_similarity(self.config.min_similarity)
        if self.config.max_caption_rank is not None:
            still_kept = undecided()
            ranks = caption_ranks(image, text, aligned.captions, still_kept)
            for i in still_kept[ranks > self.config.max_caption_rank]:
                reasons[i] = low_rank(self.config.max_caption_rank)
        duplicate_of: list[Optional[str]] = [None] * rows
        if self.config.duplicate_threshold is not None:
            candidates = undecided()
            for i, first in first_of_each_group(image[candidates], self.config.duplicate_threshold).items():
                reasons[candidates[i]] = NEAR_DUPLICATE
                duplicate_of[candidates[i]] = aligned.keys[candidates[first]]
        write_parquet(self.layout.scratch(STAGE, f"{shard}.parquet"), mask_table(aligned.keys, reasons, similarity, duplicate_of))
        return shard_record(shard, reasons, time.time() - started)

    def caption_reason(self, caption: str) -> Optional[str]:
        """Why a caption is dropped (None: it is not)."""
        text = caption.strip()
        if len(text) < self.config.min_caption_chars:
            return "caption too short"
        if self.config.max_caption_chars is not None and len(text) > self.config.max_caption_chars:
            return "caption too long"
        if self.config.language_model:
            label, score = self.language(text)
            if label not in self.config.languages or score < self.config.min_language_score:
                return "caption language"
        return None

    def language(self, text: str) -> tuple[str, float]:
        """fastText's most likely language of `text` and its probability."""
        # the model's own predict() breaks on NumPy 2 (np.array(copy=False)); its C++ binding does not
        found = load_language_model(self.config.language_model).f.predict(text.replace("\n", " "), 1, 0.0, "replace")
        if not found:
            return "", 0.0
        score, label = found[0]
        return label.replace("__label__", ""), float(score)


_LANGUAGE_MODELS: dict = {}  # per worker process: one load serves every shard task it runs


def load_language_model(url: str):
    """A fastText language id model (e.g. lid.176.bin) from any fsspec URL, loaded once per process (a remote
    one is fetched once per machine, into the temp folder under a name made from its URL)."""
    if url in _LANGUAGE_MODELS:
        return _LANGUAGE_MODELS[url]
    try:
        import fasttext
    except ImportError as error:
        raise ImportError("filter.language_model needs fastText: pip install fasttext-wheel") from error
    import hashlib
    import os
    import tempfile

    from pipeline.run.storage import is_local, read_bytes

    local = url
    if not is_local(url):
        local = os.path.join(tempfile.gettempdir(), f"dalle2-{hashlib.sha256(url.encode()).hexdigest()[:16]}.bin")
        if not os.path.exists(local):
            partial = f"{local}.{os.getpid()}.part"
            with open(partial, "wb") as f:
                f.write(read_bytes(url))
            os.replace(partial, local)
    _LANGUAGE_MODELS[url] = fasttext.load_model(local)
    return _LANGUAGE_MODELS[url]


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    x = np.asarray(embeddings, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def first_of_each_group(image: np.ndarray, threshold: float, block: int = 1024) -> dict[int, int]:
    """{row: earlier kept row it duplicates} for unit rows [N, D], greedily in order: a row is dropped when
    an earlier kept row has cosine above `threshold` with it (as faiss's range search counts). Exact; [block, N]
    similarities at a time."""
    dropped: dict[int, int] = {}
    kept = np.zeros(len(image), dtype=bool)
    for start in range(0, len(image), block):
        similarities = image[start : start + block] @ image.T
        for offset, row in enumerate(similarities):
            i = start + offset
            earlier = np.nonzero(kept[:i] & (row[:i] > threshold))[0]
            if len(earlier):
                dropped[i] = int(earlier[0])
            else:
                kept[i] = True
    return dropped


def mask_table(keys: list[str], reasons: list[Optional[str]], similarity: np.ndarray,
               duplicate_of: list[Optional[str]]) -> pa.Table:
    """The filter's columns for one shard, one row per aligned row."""
    return pa.table({
        INDEX: pa.array(np.arange(len(keys)), pa.int64()),
        KEY: pa.array(keys, pa.string()),
        KEEP: pa.array([r is None for r in reasons], pa.bool_()),
        REASON: pa.array(reasons, pa.string()),
        SIMILARITY: pa.array(np.asarray(similarity, dtype=np.float32)),
        DUPLICATE_OF: pa.array(duplicate_of, pa.string()),
    })


def shard_record(shard: str, reasons: list[Optional[str]], seconds: float) -> ShardRecord:
    """Rows in: the present ones; written: kept; failed: dropped, by reason."""
    counts = Counter(r for r in reasons if r != "absent")
    kept = counts.pop(None, 0)
    return ShardRecord(shard, kept + sum(counts.values()), kept, dict(counts), round(seconds, 3))


class RunWideDuplicates:
    """Pass 2: a faiss index of the rows kept so far (ids: their numeric keys), shard by shard in order, on the
    node's GPUs where faiss has them. An IVF index learns its lists from the first 39 x nlist kept rows; until
    then those rows are searched exactly in a flat index, so a small run loses nothing to the approximation."""

    def __init__(self, config: FilterConfig, dim: int):
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads is no news
        import faiss

        self.threshold = config.duplicate_threshold
        spec = config.duplicate_index if config.duplicate_index.startswith(("IDMap", "IVF")) else f"IDMap,{config.duplicate_index}"
        self.index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        self.warmup = None
        if not self.index.is_trained:
            faiss.extract_index_ivf(self.index).nprobe = config.duplicate_nprobe
            self.training_rows = 39 * faiss.extract_index_ivf(self.index).nlist
            self.warmup = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0  # faiss-gpu on a GPU node
        if self.warmup is None:
            self.index = self._on_device(self.index)

    def _on_device(self, index):
        """The index on the node's GPUs when faiss has them (searched there; added to there), else as it is."""
        if not self.gpu:
            return index
        import faiss

        try:
            return faiss.index_cpu_to_all_gpus(index)
        except Exception as error:  # noqa: BLE001 - an index type without a GPU version: the CPU does it
            log.warning("filter: faiss index stays on the CPU (%s)", error)
            self.gpu = False
            return index

    def check_and_add(self, image: np.ndarray, ids: np.ndarray) -> dict[int, int]:
        """{row: id of the kept row it duplicates} for unit rows `image`; the other rows are added."""
        index = self.warmup if self.warmup is not None else self.index
        dropped: dict[int, int] = {}
        if index.ntotal and len(image):
            # the nearest kept row is a duplicate when its cosine is above the threshold (a 1-NN search: GPU
            # indexes have no range search)
            similarity, found = index.search(np.ascontiguousarray(image, dtype=np.float32), 1)
            for row in np.nonzero((similarity[:, 0] > self.threshold) & (found[:, 0] >= 0))[0].tolist():
                dropped[row] = int(found[row, 0])
        keep = np.asarray([row not in dropped for row in range(len(image))], dtype=bool)
        self.add(image[keep], ids[keep])
        return dropped

    def add(self, image: np.ndarray, ids: np.ndarray) -> None:
        """Add kept rows (unit [N, D]) with their ids; trains an IVF index once enough rows have come."""
        if not len(image):
            return
        image, ids = np.ascontiguousarray(image, dtype=np.float32), ids.astype(np.int64)
        if self.warmup is None:
            self.index.add_with_ids(image, ids)
            return
        self.warmup.add_with_ids(image, ids)
        if self.warmup.ntotal >= self.training_rows:
            rows = self.warmup.index.reconstruct_n(0, self.warmup.ntotal)
            known = np.asarray([self.warmup.id_map.at(i) for i in range(self.warmup.ntotal)], dtype=np.int64)
            self.index.train(rows)
            self.index.add_with_ids(rows, known)
            self.index, self.warmup = self._on_device(self.index), None


def fingerprint(config: FilterConfig) -> dict:
    """The settings a run's masks are made under (where the work runs does not count)."""
    return {k: v for k, v in config.model_dump(mode="json").items()
            if k not in ("cpus_per_task", "distributor", "resources", "max_clip_drop", "on_large_clip_drop")}


def present_rows(layout: RunLayout, shard: str) -> int:
    """The filter's input rows of a shard, from its aligned parquet alone (0 if that cannot be read either)."""
    try:
        return sum(read_parquet(layout.aligned_files(shard)["metadata"], columns=[PRESENT]).column(PRESENT).to_pylist())
    except Exception:  # noqa: BLE001 - the shard's error is recorded anyway
        return 0


def run_filter(config: FilterConfig, root: str, ray_config: Optional[RayConfig] = None,
               holdout: Optional["Holdout"] = None) -> dict:
    """Write the keep mask of every aligned shard; returns the stage summary. With the run's `holdout`, the CLIP
    rules judge only when the run's CLIP retrieves the held-out captions well (pipeline/stages/filter/guard.py)."""
    from pipeline.stages.filter.guard import check_model_drops, model_drops, trusted_config
    from pipeline.formats.holdout import Holdout

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
        ensure_ray(ray_config, config.resources, "filter.resources")
    judged, clip_check = trusted_config(config, root, holdout if holdout is not None else Holdout([], [], [], []))
    first_pass_done = list_names(layout.scratch(STAGE), ".parquet")
    todo = [s for s in pending if s not in first_pass_done]
    _, failures = run_shards(ShardFilter(judged, root), todo, distributor=config.distributor,
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


def across_the_run(config: FilterConfig, layout: RunLayout, ledger: Ledger, done: list[str], pending: list[str]) -> None:
    """Pass 2: the kept rows of shards done before (a re-run) go into the index first, then each pending shard
    in order drops the rows that duplicate a row kept so far, writes its final mask and its ledger record."""
    from pipeline.execution.console import progress_bar

    search = None
    earlier = done if config.duplicate_threshold is not None else []  # only the duplicate search needs them
    for shard in progress_bar(iterable=earlier + pending, desc="filter: across the run", unit="shard"):
        is_done = shard in done
        if not is_done:
            crash_point("filter.mid_search")
        mask = read_parquet(layout.filter_mask(shard) if is_done else layout.scratch(STAGE, f"{shard}.parquet")).to_pydict()
        if config.duplicate_threshold is not None and len(mask[KEY]):
            image = normalized(read_aligned(layout, shard).img_emb)
            search = search or RunWideDuplicates(config, image.shape[1])
            rows = np.asarray([i for i, keep in enumerate(mask[KEEP]) if keep], dtype=np.int64)
            ids = np.asarray([int(mask[KEY][i]) for i in rows], dtype=np.int64)
            if is_done:
                search.add(image[rows], ids)
                continue
            width = len(mask[KEY][0])
            for row, duplicate in search.check_and_add(image[rows], ids).items():
                i = rows[row]
                mask[KEEP][i], mask[REASON][i] = False, NEAR_DUPLICATE
                mask[DUPLICATE_OF][i] = f"{duplicate:0{width}d}"
        if is_done:
            continue
        table = mask_table(mask[KEY], [None if keep else reason for keep, reason in zip(mask[KEEP], mask[REASON])],
                           np.asarray(mask[SIMILARITY], dtype=np.float32), mask[DUPLICATE_OF])
        write_parquet(layout.filter_mask(shard), table)
        crash_point("filter.after_mask")
        ledger.record(shard_record(shard, [None if k else r for k, r in zip(mask[KEEP], mask[REASON])], 0.0))


