"""The download stage: img2dataset's downloader, one shard per call, distributed on Ray with retries.

Every input row ends up in the shard's parquet with a status; the shard's ledger record counts the
successes as written and every other row as failed with img2dataset's error message as the reason.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Optional

import pyarrow as pa

from dalle2.faults import crash_point
from pipeline.execution.distributor import run_shards
from pipeline.execution.session import RaySession, require_session
from pipeline.formats.queries import LOST_IN_IMG2DATASET, skipped_rows
from pipeline.run.config import DownloadConfig
from pipeline.run.layout import CAPTION, DOWNLOAD, URL, RunLayout, index_width, shard_id_of
from pipeline.run.ledger import Ledger, ShardRecord
from pipeline.run.storage import filesystem, fsync_files, list_names, read_bytes, read_parquet, remove, write_atomic
from pipeline.stages.download.split import split_url_list

log = logging.getLogger(__name__)

STAGE = DOWNLOAD
SHARD_NAME_WIDTH = 5  # img2dataset's oom_shard_count: shard names are 5 digits


class ShardDownloader:
    """Download one shard of the run (the callable every distributor calls)."""

    def __init__(self, config: DownloadConfig, root: str):
        self.config, self.layout = config, RunLayout(root)
        self._downloader = None

    def _build(self):
        # img2dataset (and cv2) load on first use, in the worker, not at import time.
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        decoder_pixel_limits(self.config.max_image_area)
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import WebDatasetSampleWriter

        from pipeline.formats.fetch import FetchPolicy
        from pipeline.stages.download.hook import install

        c = self.config
        install(FetchPolicy.of(c))  # the download policy, a whole-request deadline, size checked from the header
        resizer = Resizer(
            image_size=c.image_size, resize_mode=c.resize_mode, resize_only_if_bigger=False,
            encode_quality=c.encode_quality, encode_format=c.encode_format, max_image_area=c.max_image_area,
        )
        return Downloader(
            sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=c.threads,
            save_caption=True, extract_exif=False, output_folder=self.layout.shards,
            column_list=[URL, CAPTION, *c.save_additional_columns], timeout=c.timeout,
            number_sample_per_shard=c.samples_per_shard, oom_shard_count=SHARD_NAME_WIDTH,
            compute_hash=None, verify_hash_type=None, encode_format=c.encode_format, retries=c.retries,
            user_agent_token=c.user_agent_token, disallowed_header_directives=c.disallowed_header_directives,
        )

    def __call__(self, shard: str) -> ShardRecord:
        """Download `shard`, then record what happened to each of its rows."""
        start = time.time()
        if self._downloader is None:
            self._downloader = self._build()
        source = read_bytes(self.layout.input_shard(shard))
        rows_in = input_rows(source)
        # Leftovers of an interrupted try are overwritten; the stats file is img2dataset's done marker.
        remove(self.layout.shard_stats(shard))
        # img2dataset deletes the file it downloads from: give it a copy, so the input survives a crash
        # or a retry between that and the ledger record
        copy = self.layout.scratch(STAGE, f"{shard}.arrow")
        redacted, real = redact_urls(source)  # the shards keep the redacted URL; the fetch gets the real one
        write_atomic(copy, redacted)
        from pipeline.stages.download.hook import real_urls

        with real_urls(real):
            self._downloader.download_shard((shard_id_of(shard), copy))
        crash_point("download.after_outputs")
        # img2dataset writes its outputs without an fsync: made durable here, before the ledger record (fsynced
        # itself) can name a shard whose files a power loss would leave torn
        fsync_files([self.layout.shard_tar(shard), self.layout.shard_parquet(shard), self.layout.shard_stats(shard)])
        record = self.record_of(shard, rows_in)
        record.seconds = round(time.time() - start, 3)
        Ledger(self.layout, STAGE).record(record)
        return record

    def record_of(self, shard: str, rows_in: int) -> ShardRecord:
        """Written and failed-by-reason counts from the parquet img2dataset wrote for the shard."""
        table = read_parquet(self.layout.shard_parquet(shard), columns=["status", "error_message"]).to_pydict()
        reasons: Counter = Counter()
        written = 0
        for status, message in zip(table["status"], table["error_message"]):
            if status == "success":
                written += 1
            else:
                reasons[f"{status}: {row_reason(status, message)}"] += 1
        lost = rows_in - len(table["status"])
        if lost:  # img2dataset logs and skips a row whose handling raised; count it, never drop it
            reasons[LOST_IN_IMG2DATASET] += lost
        return ShardRecord(shard, rows_in, written, dict(reasons))


def row_reason(status: Optional[str], message: Optional[str]) -> str:
    """A failed row's reason from the policy's vocabulary (pipeline/formats/policy.py), never free text."""
    from pipeline.formats.policy import resize_reason, stable_reason

    return resize_reason(message) if status == "failed_to_resize" else stable_reason(message)


def redact_urls(arrow: bytes) -> tuple[bytes, dict[int, str]]:
    """An input shard with its url column redacted, and {row: real URL} of the rows that changed."""
    from pipeline.run.redact import redact_url

    table = pa.ipc.open_file(pa.BufferReader(arrow)).read_all()
    urls = table.column(URL).to_pylist()
    redacted = [redact_url(u) for u in urls]
    real = {i: u for i, (u, r) in enumerate(zip(urls, redacted)) if u != r}
    if not real:
        return arrow, real
    table = table.set_column(table.schema.get_field_index(URL), URL, pa.array(redacted, pa.string()))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes(), real


OPENCV_PIXELS = "OPENCV_IO_MAX_IMAGE_PIXELS"  # OpenCV's decoders refuse larger images; read once per process


def decoder_pixel_limits(max_image_area: float) -> None:
    """PIL's and OpenCV's own pixel limits from max_image_area (OpenCV reads its variable once, at import)."""
    import sys

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = int(max_image_area)
    wanted = str(int(max_image_area))
    if "cv2" in sys.modules and os.environ.get(OPENCV_PIXELS) != wanted:
        log.warning("download: cv2 was imported before OPENCV_IO_MAX_IMAGE_PIXELS=%s could be set; the header "
                    "check still refuses larger images", wanted)
    os.environ[OPENCV_PIXELS] = wanted


def input_rows(arrow: bytes) -> int:
    """Rows of an input shard (the bytes of an Arrow IPC file)."""
    return pa.ipc.open_file(pa.BufferReader(arrow)).read_all().num_rows


def plan_download(config: DownloadConfig, layout: RunLayout) -> tuple[dict[str, int], list[str]]:
    """({shard: input rows} of the run, the shards still to download)."""
    shards = split_url_list(config, layout)
    done = Ledger(layout, STAGE).done() & list_names(layout.shards, layout.STATS)  # two listings
    return shards, [s for s in shards if s not in done]


def run_download(config: DownloadConfig, root: str, session: RaySession) -> dict:
    """Download every shard of the run that is not done yet; returns the stage summary."""
    require_session(session, "run_download")
    started = time.time()
    layout = RunLayout(root)
    ledger = Ledger(layout, STAGE)
    fs, shards_path = filesystem(layout.shards)
    fs.makedirs(shards_path, exist_ok=True)  # img2dataset's writer opens files in it without creating it
    shards, todo = plan_download(config, layout)
    log.info("download: %d shards, %d to do", len(shards), len(todo))
    if config.distributor == "ray":
        session.connect(config.resources, "download.resources")
    _, failures = run_shards(ShardDownloader(config, root), todo, session=session, distributor=config.distributor,
                             num_cpus=config.cpus_per_shard, retries=config.shard_retries, desc="download",
                             timeout=config.shard_timeout, resources=config.resources,
                             env={OPENCV_PIXELS: str(int(config.max_image_area))})  # before cv2 is imported
    for shard, error in failures.items():
        ledger.fail(shard, rows=shards[shard], error=error)
    skipped = skipped_rows(layout)  # malformed rows of the URL list: counted, not in any shard
    extra = {"input_rows": sum(shards.values()) + sum(skipped.values()), "input_rows_skipped": skipped,
             "samples_per_shard": config.samples_per_shard,
             "index_width": index_width(config.samples_per_shard)}
    summary = ledger.summarize(started, extra)
    if failures:
        log.error("download: %d shards failed every try (re-run to retry them): %s", len(failures), failures)
    return summary
