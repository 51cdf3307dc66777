"""`dalle2 index`: a faiss index over the CLIP image embeddings of the rows training reads (kept by the filter, the
held-out rows left out), written in parts under `<root>/index/`, searched by embedding, with each hit's image read
back from its shard.

Small runs get an exact inner-product index; large ones IVF-PQ (pq_bytes a row), trained once on rows drawn at
random and copied into every part, so that a part is one file of at most `part_rows` rows and a search merges the
parts' best hits.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from pipeline.formats.aligned import embedding_width, read_aligned
from pipeline.loaders.plan import SamplePlan
from pipeline.run.config import IndexConfig
from pipeline.run.layout import CAPTION, INDEX, KEY, SHARD, RunLayout
from pipeline.run.storage import exists, read_bytes, read_json, read_parquet, remove, write_atomic, write_json, \
    write_parquet

log = logging.getLogger(__name__)

IVF_TRAINING_PER_LIST = 39  # faiss's k-means wants at least this many training rows a list


@dataclass(frozen=True)
class Hit:
    """One search result: a training row and its cosine similarity to the query."""

    key: str
    caption: str
    shard: str
    index: int
    similarity: float


def faiss_module():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads is no news
    import faiss

    return faiss


def index_plan(config: IndexConfig, rows: int, dim: int) -> dict:
    """The index's kind and IVF-PQ settings for `rows` rows of width `dim`; ValueError naming the field at fault."""
    kind = config.kind if config.kind != "auto" else ("flat" if rows <= config.flat_max_rows else "ivf_pq")
    if kind == "flat":
        return {"kind": "flat"}
    if dim % config.pq_bytes:
        raise ValueError(f"index.pq_bytes={config.pq_bytes} must divide the embedding width {dim}")
    nlist = config.nlist or max(1, int(4 * math.sqrt(rows)))
    nlist = min(nlist, max(1, rows // IVF_TRAINING_PER_LIST))  # every list learnt from enough rows
    return {"kind": "ivf_pq", "nlist": nlist, "pq_bytes": config.pq_bytes, "pq_bits": config.pq_bits,
            "nprobe": config.nprobe}


def read_shard_rows(layout: RunLayout, plan: SamplePlan, shard: str) -> tuple[np.ndarray, dict]:
    """(unit image embeddings float32 [n, D], their key, caption, shard and index columns) of a shard's planned rows."""
    indices = plan.indices(shard)
    aligned = read_aligned(layout, shard)
    embeds = np.asarray(aligned.img_emb[indices], dtype=np.float32)
    embeds /= np.maximum(np.linalg.norm(embeds, axis=1, keepdims=True), 1e-12)
    columns = {KEY: [aligned.keys[i] for i in indices], CAPTION: [aligned.captions[i] for i in indices],
               SHARD: [shard] * len(indices), INDEX: indices.tolist()}
    return embeds, columns


def trained_template(layout: RunLayout, plan: SamplePlan, settings: dict, dim: int, config: IndexConfig):
    """An empty IVF-PQ index whose lists and codebooks are learnt from up to `train_rows` rows drawn at random."""
    faiss = faiss_module()
    rng = np.random.default_rng(config.seed)
    wanted = max(config.train_rows, (settings["nlist"] + 2 ** settings["pq_bits"]) * IVF_TRAINING_PER_LIST)
    chunks, held = [], 0
    for shard in rng.permutation(sorted(plan.counts)).tolist():  # shards at random until enough rows are drawn
        embeds, _ = read_shard_rows(layout, plan, shard)
        share = max(1, math.ceil(wanted * len(embeds) / plan.size))
        chunks.append(embeds[rng.permutation(len(embeds))[:share]])
        held += len(chunks[-1])
        if held >= wanted:
            break
    spec = f"IVF{settings['nlist']},PQ{settings['pq_bytes']}x{settings['pq_bits']}"
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    index.train(np.concatenate(chunks))
    return index


def build_index(root: str, config: IndexConfig, filtered: bool,
                progress: Optional[Callable[[int], None]] = None) -> dict:
    """Index the training rows of the run at `root`; returns the summary it writes last (rows, kind, parts)."""
    faiss = faiss_module()
    layout = RunLayout(root)
    plan = SamplePlan.from_aligned(root, filtered=filtered, part="train")
    dim = embedding_width(layout)
    if not plan.size or dim is None:
        raise ValueError(f"{root}: no training rows to index (the filter kept none, or nothing is embedded yet)")
    settings = index_plan(config, plan.size, dim)
    if exists(layout.index_summary):
        remove(layout.index_summary)  # no done marker while the parts change
    template = trained_template(layout, plan, settings, dim, config) if settings["kind"] == "ivf_pq" else None
    parts: list[dict] = []
    chunks: list[np.ndarray] = []  # rows read and not yet written, joined only when a part is written
    columns_held: dict[str, list] = {name: [] for name in (KEY, CAPTION, SHARD, INDEX)}

    def write_part(count: int) -> None:
        """The first `count` rows held become the next part: its faiss file, then its rows."""
        held = np.concatenate(chunks)
        index = faiss.IndexFlatIP(dim) if template is None else faiss.clone_index(template)
        index.add(held[:count])
        files = layout.index_part(len(parts))
        write_atomic(files["faiss"], faiss.serialize_index(index).tobytes())
        import pyarrow as pa

        write_parquet(files["rows"], pa.table({name: values[:count] for name, values in columns_held.items()}))
        parts.append({"rows": count})
        chunks[:] = [held[count:]]
        for values in columns_held.values():
            del values[:count]

    for shard in sorted(plan.counts):
        embeds, columns = read_shard_rows(layout, plan, shard)
        chunks.append(embeds)
        for name, values in columns.items():
            columns_held[name] += values
        while len(columns_held[KEY]) >= config.part_rows:  # a part is at most part_rows rows, whatever the shards
            write_part(config.part_rows)
        if progress:
            progress(1)
    if columns_held[KEY]:
        write_part(len(columns_held[KEY]))
    for stale in range(len(parts), len(parts) + 1000):  # parts of an earlier, larger build
        files = layout.index_part(stale)
        if not exists(files["faiss"]):
            break
        remove(files["faiss"]), remove(files["rows"])
    summary = {**settings, "rows": plan.size, "dim": dim, "parts": parts, "shards": len(plan.counts),
               "filtered": filtered, "config": config.model_dump(mode="json")}
    write_json(layout.index_summary, summary)
    log.info("indexed %d training rows of %d shards (%s, %d parts) under %s/index", plan.size, len(plan.counts),
             settings["kind"], len(parts), root)
    return summary


class DataIndex:
    """A run's data index, loaded whole: search by unit embeddings."""

    def __init__(self, root: str):
        faiss = faiss_module()
        layout = RunLayout(root)
        if not exists(layout.index_summary):
            raise FileNotFoundError(f"no data index under {root}/index: run `dalle2 index --root {root}` first")
        self.summary = read_json(layout.index_summary)
        self.parts = []
        for number in range(len(self.summary["parts"])):
            files = layout.index_part(number)
            index = faiss.deserialize_index(np.frombuffer(read_bytes(files["faiss"]), dtype=np.uint8))
            if self.summary["kind"] == "ivf_pq":
                faiss.extract_index_ivf(index).nprobe = self.summary["nprobe"]
            self.parts.append((index, read_parquet(files["rows"]).to_pydict()))

    def __len__(self) -> int:
        return sum(index.ntotal for index, _ in self.parts)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The `k` nearest training rows of each query [Q, D] (unit vectors), most similar first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found: list[list[Hit]] = [[] for _ in range(len(queries))]
        for index, rows in self.parts:
            similarities, positions = index.search(queries, min(k, index.ntotal))
            for q in range(len(queries)):
                found[q] += [Hit(rows[KEY][p], rows[CAPTION][p], rows[SHARD][p], int(rows[INDEX][p]), float(s))
                             for s, p in zip(similarities[q], positions[q]) if p >= 0]
        return [sorted(hits, key=lambda hit: -hit.similarity)[:k] for hits in found]


class ShardImages:
    """The encoded image of a training row, read from its shard: each shard's image offsets are found once (the
    last `shards` shards' are kept), then each image is one ranged read."""

    def __init__(self, root: str, shards: int = 64):
        self.layout, self.capacity = RunLayout(root), shards
        self.spans: OrderedDict[str, Optional[dict]] = OrderedDict()

    def image(self, shard: str, key: str) -> Optional[bytes]:
        """The image bytes of `key` in `shard`, or None when the shard holds none for it."""
        from pipeline.formats.shard_reader import image_of, image_spans, iter_samples, read_span

        tar = self.layout.shard_tar(shard)
        if shard not in self.spans:
            self.spans[shard] = image_spans(tar)
            while len(self.spans) > self.capacity:
                self.spans.popitem(last=False)
        self.spans.move_to_end(shard)
        spans = self.spans[shard]
        if spans is None:  # a compressed shard: read through to the key
            return next((image_of(fields) for name, fields in iter_samples(tar) if name == key), None)
        return read_span(tar, *spans[key]) if key in spans else None
