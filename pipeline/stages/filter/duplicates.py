"""Pass 2 of the filter, in the driver: shards in order against a faiss index of the rows kept so far, each shard's
final mask and ledger record."""

from __future__ import annotations

import logging

import numpy as np

from dalle2.faults import crash_point
from pipeline.formats.aligned import read_aligned
from pipeline.run.config import FilterConfig
from pipeline.run.layout import DUPLICATE_OF, KEEP, KEY, REASON, SIMILARITY, RunLayout
from pipeline.run.ledger import Ledger
from pipeline.run.storage import read_parquet, write_parquet
from pipeline.stages.filter.rules import NEAR_DUPLICATE, normalized
from pipeline.stages.filter.shards import mask_table, shard_record

log = logging.getLogger(__name__)


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
        mask = read_parquet(layout.filter_mask(shard) if is_done else layout.filter_first_pass(shard)).to_pydict()
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
