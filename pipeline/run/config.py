"""Typed configs of the data stages; every field has a default that works on a laptop."""

from __future__ import annotations

import os
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field, NonNegativeInt, PositiveFloat, PositiveInt, field_serializer

from dalle2.configs import StrictModel

# img2dataset's defaults (main.download): X-Robots-Tag directives that opt an image out of AI training
DEFAULT_DISALLOWED_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


def _custom_only(resources: dict[str, float]) -> dict[str, float]:
    reserved = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(resources))
    if reserved:
        raise ValueError(f"{reserved} have fields of their own (cpus_*, num_gpus_per_actor, use_gpu); resources names "
                         "the custom resources of node types (cluster.yaml's cpu_pool / gpu_pool)")
    return resources


# Custom Ray resources a stage's tasks (or actors, or training workers) each ask for, which place them on the node
# types that declare them: cluster.yaml gives CPU workers {cpu_pool: 1000} and GPU workers {gpu_pool: 1000}, and a
# stage asking {cpu_pool: 0.001} runs on CPU workers only. An embedded local Ray is every pool at once.
Resources = Annotated[dict[str, PositiveFloat], AfterValidator(_custom_only)]


class RayConfig(StrictModel):
    """Where stages run. With no address (and no RAY_ADDRESS), an embedded local Ray is started."""

    address: Optional[str] = None  # a cluster's address; "auto": the local Ray `ray start --head` keeps up
    # Logical CPUs of the embedded local Ray. More than the machine's cores is deliberate: Ray Data
    # pipelines with several operators deadlock on a 2-CPU cluster (see environment notes).
    num_cpus: Optional[PositiveInt] = None

    def local_cpus(self) -> int:
        return self.num_cpus or max(4, os.cpu_count() or 1)


class DownloadConfig(StrictModel):
    """img2dataset on Ray: URL list in, webdataset shards out."""

    url_list: Optional[str] = None  # csv, tsv, parquet or jsonl; local or any fsspec URL
    input_format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    save_additional_columns: list[str] = []
    image_size: PositiveInt = 64
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "center_crop"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(default=95, ge=0, le=100)  # png: compression 0-9 (img2dataset checks)
    # img2dataset's key has ceil(log10(n)) index digits: n = 1 would give none, so 2 is the least
    samples_per_shard: int = Field(default=1000, ge=2)
    threads: PositiveInt = 16  # download threads per shard
    timeout: float = Field(default=10.0, gt=0, le=3600)  # seconds per image request, the whole body included
    retries: NonNegativeInt = 0  # per image
    shard_retries: NonNegativeInt = 2  # a failed shard task is run again this many times
    # seconds from submitting a shard task to its end (queue and retries included) before it is cancelled and
    # failed (Ray); None: no limit, each request's own `timeout` bounds a shard to rows x timeout / threads
    shard_timeout: Optional[float] = Field(default=None, gt=0, le=7 * 86400)
    # larger images fail with a reason, before their body is read; OpenCV's limit is set from it as an integer
    max_image_area: float = Field(default=1e8, gt=0, le=1e12)
    cpus_per_shard: PositiveFloat = 0.5
    resources: Resources = {}  # e.g. {cpu_pool: 0.001}: download on the CPU workers
    distributor: Literal["ray", "local"] = "ray"
    # The download policy (pipeline/formats/policy.py). Private, loopback and other non-global addresses are refused
    # unless this is set (a crawl on a cloud VM must not reach its neighbours); link-local and cloud metadata
    # addresses are refused always.
    allow_private_network: bool = False
    max_bytes: int = Field(default=32 << 20, ge=1024, le=1 << 31)  # per response body, refused past it
    # X-Robots-Tag directives that opt an image out (img2dataset's names and defaults); [] honours none
    disallowed_header_directives: list[str] = Field(default_factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES))
    user_agent_token: Optional[str] = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")  # also in User-Agent
    skip_malformed_rows: bool = False  # a malformed URL-list line: skipped and counted instead of an error
    redirects: int = Field(default=5, ge=0, le=20)  # hops followed, each one checked like the first URL

    @field_serializer("url_list", when_used="json")
    def _redacted(self, url_list: Optional[str]) -> Optional[str]:
        """A signed url_list is stored (config.yaml) without its signature."""
        from pipeline.run.redact import redact_url

        return redact_url(url_list) if url_list else url_list


class ClipSource(StrictModel):
    """The CLIP to embed with: an open_clip name (+ a pretrained tag, or a weights file at a local path or any fsspec
    URL), or a checkpoint folder."""

    model_name: str = "tiny-clip"
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None  # a folder written by ClipAdapter.save or train_clip


class EmbedConfig(StrictModel):
    """CLIP embeddings of every image and caption in the shards."""

    clip: ClipSource = ClipSource()
    batch_size: PositiveInt = 256  # clip-retrieval's default; Ray's cost per batch is a fifth of a tiny CLIP's at 64
    actors: PositiveInt = 1  # CLIP actors in the pool
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    cpus_per_actor: PositiveFloat = 0.5  # Ray also gives the actor this many torch threads (OMP_NUM_THREADS)
    torch_threads: Optional[PositiveInt] = None  # override the actor's torch threads
    decode_cpus: PositiveFloat = 0.25  # per decode task
    decode_concurrency: PositiveInt = 2  # decode tasks at once (each reads and decodes one shard)
    decode_block_rows: PositiveInt = 256  # rows a decode task sends on at once: Ray's cost per block stays small
    # seconds a decode task may spend reading and decoding one shard (the time it waits for CLIP to take its
    # blocks is not counted) before the shard fails with this field named and the task moves on; a 10,000-sample
    # shard of 512 px JPEGs reads and decodes in well under a minute, so this stops only a hung read
    shard_timeout: Optional[float] = Field(default=600.0, gt=0, le=86400)
    # scratch-part writes and shard finishes at once, each: every task running at once needs its own worker
    # process, whose imports cost seconds of CPU on a small machine; raise it where writes wait on an object store
    write_concurrency: PositiveInt = 1
    autocast: Literal["none", "bf16", "fp16"] = "none"
    output_dtype: Literal["float16", "float32"] = "float16"
    write_clip_retrieval: bool = True
    resources: Resources = {}  # e.g. {gpu_pool: 0.001}: actors and decode tasks on the GPU workers


class ReorderConfig(StrictModel):
    """clip-retrieval embeddings (rows in any order, identified by key) -> the aligned layout."""

    source: Optional[str] = None  # folder with img_emb/, text_emb/ (optional), metadata/; default <root>/embeddings
    index_width: Optional[PositiveInt] = None  # digits of the in-shard index; inferred from shard names when None
    samples_per_shard: Optional[PositiveInt] = None  # rows of each aligned file; inferred from shard parquets when None
    cpus_per_task: PositiveFloat = 0.5
    resources: Resources = {}  # e.g. {cpu_pool: 0.001}
    distributor: Literal["ray", "local"] = "ray"


class HoldoutConfig(StrictModel):
    """The run's held-out rows: drawn once from the downloaded rows before any training, trained on by no stage,
    and the pool every evaluation draws from (prompts, real images, R-precision's captions, the filter's check of
    its CLIP)."""

    rows: NonNegativeInt = 500  # at most this many (0: none, and nothing is evaluated on unseen rows)
    max_fraction: float = Field(default=0.1, gt=0, le=0.5)  # and at most this share of the run's rows
    # drawn from this many shards at most (chosen at random), so that planning a training epoch reads the row
    # lists of a few shards to leave them out, not of every shard
    max_shards: PositiveInt = 64
    seed: NonNegativeInt = 0


class FilterConfig(StrictModel):
    """Which aligned rows training reads: a keep mask with a reason per dropped row (nothing is deleted).

    The defaults keep every row with a caption, so a run whose CLIP is not pretrained is never emptied;
    LAION's choices for a pretrained ViT-B/32 are min_similarity 0.28 and near-duplicates above ~0.95."""

    enabled: bool = True
    min_similarity: Optional[float] = Field(default=None, ge=-1, le=1)  # CLIP cosine of image and caption
    # where the caption must rank among the shard's distinct captions for its image (1: CLIP's first choice);
    # scale-free, for a CLIP trained from scratch whose cosines no absolute threshold separates
    max_caption_rank: Optional[PositiveInt] = None
    duplicate_threshold: Optional[float] = Field(default=None, gt=0, lt=1)  # image cosine above it: keep the first
    # faiss index factory string of the run-wide duplicate search: "Flat" is exact (4 x dim bytes a kept row);
    # "IVF4096,SQ8" is approximate and bounds memory at dim bytes a row (trained on the first shards' rows)
    duplicate_index: str = "Flat"
    duplicate_nprobe: PositiveInt = 16  # IVF lists searched per query
    min_caption_chars: NonNegativeInt = 1
    max_caption_chars: Optional[PositiveInt] = None
    language_model: Optional[str] = None  # fastText language id model (lid.176.bin), local or any fsspec URL
    languages: list[str] = ["en"]  # with language_model: captions in other languages are dropped
    min_language_score: float = Field(default=0.5, ge=0, le=1)
    # the model rules (similarity, caption rank, language) may drop at most this share of the run's rows; past
    # it the stage stops naming each rule and its share, unless on_large_clip_drop: continue (pipeline/stages/filter/guard.py)
    max_clip_drop: float = Field(default=0.2, ge=0, le=1)
    on_large_clip_drop: Literal["stop", "continue"] = "stop"
    # the CLIP rules judge only when the run's CLIP picks a held-out image's own caption among the held-out
    # captions at least this often; below, they are skipped (on_untrusted_clip: skip) or applied anyway (apply).
    # A caption-rank rule drops a right row whenever CLIP ranks its caption second: a CLIP right less than 80% of
    # the time would drop more good rows than max_clip_drop allows (the demo's 40-step CLIP: 50-60%, 72% dropped)
    min_clip_retrieval: float = Field(default=0.8, ge=0, le=1)
    on_untrusted_clip: Literal["skip", "apply"] = "skip"
    cpus_per_task: PositiveFloat = 0.5
    resources: Resources = {}  # e.g. {cpu_pool: 0.001}: pass 1 on the CPU workers
    distributor: Literal["ray", "local"] = "ray"


class IndexConfig(StrictModel):
    """`dalle2 index`: a faiss index of the training rows' CLIP image embeddings, searched by text or image (the
    service's page shows the nearest training images beside what the model drew)."""

    enabled: bool = True  # a stage of `dalle2 run` and the demo, after training
    # flat: exact inner product (4 x dim bytes a row); ivf_pq: approximate, pq_bytes a row; auto: flat up to
    # flat_max_rows rows, IVF-PQ above
    kind: Literal["auto", "flat", "ivf_pq"] = "auto"
    flat_max_rows: PositiveInt = 1_000_000
    nlist: Optional[PositiveInt] = None  # IVF lists (None: 4 x sqrt(rows), with at least 39 training rows a list)
    pq_bytes: PositiveInt = 32  # PQ sub-vectors a row: must divide the embedding width
    pq_bits: int = Field(default=8, ge=4, le=8)  # bits of each sub-vector's code (2^bits centroids each)
    nprobe: PositiveInt = 16  # IVF lists searched per query
    train_rows: PositiveInt = 200_000  # rows (drawn at random) that train IVF-PQ's quantizers
    part_rows: PositiveInt = 2_000_000  # rows per index file: a larger run is written as several parts
    seed: NonNegativeInt = 0

