"""The download and embed stages against a server that behaves like the web at its worst: every row ends
written or failed with its reason, nothing waits past the configured deadline, and the ledger reconciles."""

import time

import pandas as pd

from jobs.status import run_status
from pipeline.config import DownloadConfig, EmbedConfig
from pipeline.download import run_download
from pipeline.embed import run_embed
from pipeline.layout import RunLayout
from pipeline.storage import read_parquet
from tests.worst_web import WorstWeb

TIMEOUT = 3.0


def test_every_row_of_the_worst_web_is_counted_with_its_reason_within_the_deadline(tmp_path, ray_local):
    with WorstWeb() as web:
        url_list = tmp_path / "urls.parquet"
        rows = web.rows()
        pd.DataFrame(rows).to_parquet(url_list)
        root = str(tmp_path / "run")
        config = DownloadConfig(url_list=str(url_list), image_size=32, samples_per_shard=len(rows), threads=16,
                                timeout=TIMEOUT, max_image_area=1e8, distributor="local")
        started = time.monotonic()
        summary = run_download(config, root)
        took = time.monotonic() - started

    # the drip and the endless huge image would each hold a plain urllib request for WorstWeb.DRIP_SECONDS
    assert took < TIMEOUT + 12, took
    assert summary["input_rows"] == summary["rows_in"] == len(rows) == summary["written"] + summary["failed"]
    expected_written = sum(reason is None for _, _, reason in web.cases)
    assert summary["written"] == expected_written == 5 and not summary["failed_shards"]

    table = read_parquet(RunLayout(root).shard_parquet("00000")).to_pydict()
    by_url = {}
    for url, caption, status, message in zip(table["url"], table["caption"], table["status"], table["error_message"]):
        by_url.setdefault((url, caption), []).append(f"{status}: {message}")
    for path, caption, reason in web.cases:
        (outcome,) = by_url[(web.url + path, caption)]
        if reason is None:
            assert outcome.startswith("success"), (path, outcome)
        else:
            assert reason in outcome and not outcome.startswith("success"), (path, reason, outcome)

    embedded = run_embed(EmbedConfig(batch_size=8), root)
    assert embedded["rows_in"] == summary["written"] == embedded["written"] and not embedded["failed_shards"]
    status = run_status(root)
    assert status["problems"] == [] and status["download"]["failed"] == len(rows) - expected_written
