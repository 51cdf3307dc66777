"""The one place that knows how a run is laid out: folders, shard names, sample keys, column names.

    <root>/inputs/{shard}.arrow                   the URL list split into shards (download's input)
    <root>/shards/{shard}.tar|.parquet|_stats.json webdataset shards, as img2dataset writes them
    <root>/embeddings/img_emb/img_emb_{n}.npy      clip-retrieval's layout (n = shard id here)
                     text_emb/text_emb_{n}.npy
                     metadata/metadata_{n}.parquet   (key, caption)
    <root>/aligned/img_emb/img_emb_{shard}.npy     row i = sample index i of that shard
                  text_emb/text_emb_{shard}.npy
                  {shard}.parquet                   (index, key, caption, present)
    <root>/filter/{shard}.parquet                  (index, key, keep, reason, similarity, duplicate_of): which
                                                   aligned rows training reads, and why each other one is not
    <root>/index/part_{i}.faiss|.parquet           dalle2 index: the training rows' image embeddings in faiss, and
                                                   each part's rows (key, caption, shard, index)
    <root>/index/index.json                        the index's settings and parts (written last)
    <root>/ledger/{stage}/{shard}.json             per-shard record: the stage's done marker
    <root>/ledger/{stage}/_failed/{shard}.json     a shard that failed every try (rows, error)
    <root>/ledger/{stage}.json                     the stage's summary
    <root>/ledger/{stage}_fingerprint.json         what the stage's outputs were made from
    <root>/train/{job}/checkpoint_*/               Ray Train's checkpoints of a training job (TrainLayout)
    <root>/train/{job}/metrics.jsonl|progress.json  its curves, and the step the driver's progress bar shows
    <root>/train/{job}/tensorboard/ samples/       TensorBoard's events (local roots), the decoder's sample grids
    <root>/train/{job}_summary.json                the job's final metrics and checkpoint

A key is img2dataset's: the shard id followed by the sample's index in the shard, zero-padded to
`index_width` digits (the number of digits of samples-per-shard - 1: 10,000 per shard gives 4).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# Column names shared by every stage.
KEY, CAPTION, URL, INDEX, PRESENT, SHARD = "key", "caption", "url", "index", "present", "shard"
KEEP, REASON, SIMILARITY, DUPLICATE_OF = "keep", "reason", "similarity", "duplicate_of"  # the filter's columns


def index_width(samples_per_shard: int) -> int:
    """Digits of the in-shard index, as img2dataset computes them (ceil(log10(n)))."""
    return max(1, math.ceil(math.log10(samples_per_shard)))


def shard_width(shard_count: int) -> int:
    """Digits of shard names: at least 5, as img2dataset's default, more for huge runs."""
    return max(5, len(str(max(shard_count - 1, 0))))


def shard_name(shard_id: int, width: int = 5) -> str:
    """The zero-padded name of a shard."""
    return f"{shard_id:0{width}d}"


def make_key(shard_id: int, index: int, shard_digits: int, index_digits: int) -> str:
    """The key of sample `index` of shard `shard_id`."""
    if index >= 10**index_digits:
        raise ValueError(f"index {index} does not fit in {index_digits} digits")
    return f"{shard_id:0{shard_digits}d}{index:0{index_digits}d}"


def parse_key(key: str, index_digits: int) -> tuple[int, int]:
    """(shard_id, index) of a key; raises ValueError naming the key if it is not one."""
    if not key.isdigit() or len(key) <= index_digits:
        raise ValueError(f"key {key!r} is not a shard id followed by a {index_digits}-digit index")
    return int(key[:-index_digits]), int(key[-index_digits:])


def shard_id_of(name: str) -> int:
    """The shard id of a shard file name like '00012.tar' or 'img_emb_12.npy'."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
    digits = stem.rsplit("_", 1)[-1]
    if not digits.isdigit():
        raise ValueError(f"{name!r} is not named after a shard id")
    return int(digits)


# the stages' names in the ledger (`<root>/ledger/<stage>/`)
DOWNLOAD, EMBED, REORDER, FILTER = "download", "embed", "reorder", "filter"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run under `root` (a local path or any fsspec URL)."""

    root: str
    STATS = "_stats.json"  # <shard><STATS>: img2dataset's last file of a shard

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def inputs(self) -> str:
        return self._join("inputs")

    @property
    def shards(self) -> str:
        return self._join("shards")

    @property
    def embeddings(self) -> str:
        return self._join("embeddings")

    @property
    def aligned(self) -> str:
        return self._join("aligned")

    @property
    def filter(self) -> str:
        return self._join("filter")

    @property
    def holdout(self) -> str:
        """The run's held-out rows (pipeline/formats/holdout.py): fixed before any training, used by none."""
        return self._join("holdout.parquet")

    def filter_mask(self, name: str) -> str:
        """The filter's keep mask of shard `name` (one row per aligned row)."""
        return self._join("filter", f"{name}.parquet")

    def filter_first_pass(self, name: str) -> str:
        """A shard's mask after the filter's first pass (per shard), before the run-wide duplicate search."""
        return self.scratch(FILTER, f"{name}.parquet")

    @property
    def split_marker(self) -> str:
        """Written last by the URL list's split: lists the input shards (download's first done marker)."""
        return self._join("inputs", "_SUCCESS.json")

    def input_shard(self, name: str) -> str:
        return self._join("inputs", f"{name}.arrow")

    def shard_tar(self, name: str) -> str:
        return self._join("shards", f"{name}.tar")

    def shard_parquet(self, name: str) -> str:
        return self._join("shards", f"{name}.parquet")

    def shard_stats(self, name: str) -> str:
        return self._join("shards", f"{name}{self.STATS}")

    def clip_retrieval_files(self, n: int) -> dict[str, str]:
        """clip-retrieval's three files of part `n`."""
        return {
            "img_emb": self._join("embeddings", "img_emb", f"img_emb_{n}.npy"),
            "text_emb": self._join("embeddings", "text_emb", f"text_emb_{n}.npy"),
            "metadata": self._join("embeddings", "metadata", f"metadata_{n}.parquet"),
        }

    def aligned_files(self, name: str) -> dict[str, str]:
        """The shard-aligned embedding files of shard `name`."""
        return {
            "img_emb": self._join("aligned", "img_emb", f"img_emb_{name}.npy"),
            "text_emb": self._join("aligned", "text_emb", f"text_emb_{name}.npy"),
            "metadata": self._join("aligned", f"{name}.parquet"),
        }

    @property
    def index_summary(self) -> str:
        """`dalle2 index`'s settings and parts, written after every part: the index's done marker."""
        return self._join("index", "index.json")

    def index_part(self, part: int) -> dict[str, str]:
        """One part of the data index: its faiss file and its rows' parquet."""
        return {"faiss": self._join("index", f"part_{part:04d}.faiss"),
                "rows": self._join("index", f"part_{part:04d}.parquet")}

    def ledger_record(self, stage: str, name: str) -> str:
        return self._join("ledger", stage, f"{name}.json")

    def ledger_dir(self, stage: str) -> str:
        return self._join("ledger", stage)

    def ledger_summary(self, stage: str) -> str:
        return self._join("ledger", f"{stage}.json")

    def ledger_fingerprint(self, stage: str) -> str:
        return self._join("ledger", f"{stage}_fingerprint.json")

    def ledger_failure(self, stage: str, name: str) -> str:
        return self._join("ledger", stage, "_failed", f"{name}.json")

    def scratch(self, *parts: str) -> str:
        """A folder for a stage's intermediate files (removed when the stage completes)."""
        return self._join("_scratch", *parts)


@dataclass(frozen=True)
class TrainLayout:
    """Paths of a run's training jobs (clip, prior, decoder, decoder_unet2, ...) under `<root>/train`."""

    root: str
    SUMMARY = "_summary.json"  # <job><SUMMARY>: a job's final metrics, beside its folder
    # the jobs `dalle2 import` writes DALLE2-pytorch weights under (one checkpoint each), by model
    IMPORTED = {"prior": "prior_imported", "decoder": "decoder_imported"}

    @property
    def storage(self) -> str:
        """Ray Train's storage_path for the run: `<root>/train`, absolute when local (every worker names it)."""
        if "://" in self.root:
            return self.root.rstrip("/") + "/train"
        return os.path.abspath(os.path.join(self.root, "train"))

    def job(self, job_name: str) -> str:
        """The job's folder: Ray Train's checkpoints, curves and samples."""
        return f"{self.storage}/{job_name}"

    def summary(self, job_name: str) -> str:
        return f"{self.storage}/{job_name}{self.SUMMARY}"

    def history(self, job_name: str) -> str:
        return f"{self.job(job_name)}/metrics.jsonl"

    def progress(self, job_name: str) -> str:
        return f"{self.job(job_name)}/progress.json"

    def best(self, job_name: str) -> str:
        """The pointer to the job's best checkpoint by validation loss (keep_best): its folder, step and loss."""
        return f"{self.job(job_name)}/best.json"

    def mlflow_run(self, job_name: str) -> str:
        """The id of the job's MLflow run (tracking.mlflow), which a restart continues."""
        return f"{self.job(job_name)}/mlflow_run.json"

    def wandb_run(self, job_name: str) -> str:
        """The id of the job's W&B run (tracking.wandb), which a restart continues."""
        return f"{self.job(job_name)}/wandb_run.json"

    def best_checkpoint(self, job_name: str, step: int) -> str:
        """Where a best checkpoint's folder goes (`_<id>` follows: each save its own), outside Ray's retention."""
        return f"{self.job(job_name)}/best/step_{step}"

    def tensorboard(self, job_name: str) -> str:
        return f"{self.job(job_name)}/tensorboard"

    def sample_grid(self, job_name: str, step: int) -> str:
        return f"{self.job(job_name)}/samples/step_{step}.png"

    def sample_grids(self, job_name: str) -> str:
        return f"{self.job(job_name)}/samples"
