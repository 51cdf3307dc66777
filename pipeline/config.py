"""Typed configs of the data stages; every field has a default that works on a laptop."""

from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import field_validator

from dalle2.configs import StrictModel


class RayConfig(StrictModel):
    """Where stages run. With no address (and no RAY_ADDRESS), an embedded local Ray is started."""

    address: Optional[str] = None
    # Logical CPUs of the embedded local Ray. More than the machine's cores is deliberate: Ray Data
    # pipelines with several operators deadlock on a 2-CPU cluster (see environment notes).
    num_cpus: Optional[int] = None

    def local_cpus(self) -> int:
        return self.num_cpus or max(4, os.cpu_count() or 1)


class DownloadConfig(StrictModel):
    """img2dataset on Ray: URL list in, webdataset shards out."""

    url_list: Optional[str] = None  # csv, tsv, parquet or jsonl; local or any fsspec URL
    input_format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    save_additional_columns: list[str] = []
    image_size: int = 64
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "center_crop"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    samples_per_shard: int = 1000
    threads: int = 16  # download threads per shard
    timeout: float = 10.0  # seconds per image request
    retries: int = 0  # per image
    shard_retries: int = 2  # a failed shard task is run again this many times
    max_image_area: float = 1e8  # larger images fail with a reason instead of exhausting memory
    cpus_per_shard: float = 0.5
    distributor: Literal["ray", "local"] = "ray"

    @field_validator("samples_per_shard")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value


class ClipSource(StrictModel):
    """The CLIP to embed with: an open_clip name (+ pretrained tag), or a checkpoint folder."""

    model_name: str = "tiny-clip"
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None  # a folder written by ClipAdapter.save or train_clip


class EmbedConfig(StrictModel):
    """CLIP embeddings of every image and caption in the shards."""

    clip: ClipSource = ClipSource()
    batch_size: int = 64
    actors: int = 1  # CLIP actors in the pool
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.5  # Ray also gives the actor this many torch threads (OMP_NUM_THREADS)
    torch_threads: Optional[int] = None  # override the actor's torch threads
    decode_cpus: float = 0.25  # per decode task
    decode_concurrency: int = 2
    autocast: Literal["none", "bf16", "fp16"] = "none"
    output_dtype: Literal["float16", "float32"] = "float16"
    write_clip_retrieval: bool = True


class ReorderConfig(StrictModel):
    """clip-retrieval embeddings (rows in any order, identified by key) -> the aligned layout."""

    source: Optional[str] = None  # folder with img_emb/, text_emb/ (optional), metadata/; default <root>/embeddings
    index_width: Optional[int] = None  # digits of the in-shard index; inferred from shard names when None
    samples_per_shard: Optional[int] = None  # rows of each aligned file; inferred from shard parquets when None
    cpus_per_task: float = 0.5
