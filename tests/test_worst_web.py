"""The download and embed stages against a server that behaves like the web at its worst: every row ends
written or failed with its reason, nothing waits past the configured deadline, and the ledger reconciles.
The hostile URLs of the list (file://, ftp://, data:, the metadata service, redirects there) are refused
before any connection, failure reasons stay the policy's vocabulary, and signed URLs are stored redacted."""

import json
import time

import pandas as pd

from jobs.status import run_status
from pipeline.execution.session import RaySession
from pipeline.run.config import DownloadConfig, EmbedConfig
from pipeline.stages.download.stage import run_download
from pipeline.stages.embed.stage import run_embed
from pipeline.run.layout import RunLayout
from pipeline.formats.policy import stable_reason
from pipeline.formats.shard_reader import iter_samples
from pipeline.run.storage import read_parquet
from tests.worst_web import WorstWeb

TIMEOUT = 3.0


def test_every_row_of_the_worst_web_is_counted_with_its_reason_within_the_deadline(tmp_path, ray_local, monkeypatch):
    from pipeline.formats import fetch

    connected = []  # every address a connection was opened to (the local distributor fetches in this process)
    real_connect = fetch._connect
    monkeypatch.setattr(fetch, "_connect", lambda address, *a, **k: connected.append(address[0]) or real_connect(address, *a, **k))
    with WorstWeb() as web:
        url_list = tmp_path / "urls.parquet"
        rows = web.rows()
        pd.DataFrame(rows).to_parquet(url_list)
        root = str(tmp_path / "run")
        config = DownloadConfig(url_list=str(url_list), image_size=32, samples_per_shard=len(rows), threads=16,
                                timeout=TIMEOUT, max_image_area=1e8, distributor="local", max_bytes=1 << 20,
                                allow_private_network=True, user_agent_token="dalle2-test")
        started = time.monotonic()
        summary = run_download(config, root, RaySession())
        took = time.monotonic() - started

    # the drip and the endless huge image would each hold a plain urllib request for WorstWeb.DRIP_SECONDS: the
    # reasons below prove the deadline (a drip read to its end fails as `truncated body`, not `timed out`); the
    # time bound only catches rows waited for one after another, with slack for a loaded 2-core machine
    assert took < 2 * WorstWeb.DRIP_SECONDS, took
    assert summary["input_rows"] == summary["rows_in"] == len(rows) == summary["written"] + summary["failed"]
    expected_written = sum(reason is None for _, _, reason in web.cases)
    assert summary["written"] == expected_written == 8 and not summary["failed_shards"]
    # nothing but the test server was ever connected to: the metadata service, file:// and ftp:// never were
    assert connected and set(connected) == {"127.0.0.1"}, set(connected)
    assert not any(path.startswith("/latest") for path in web.requests)
    # /status/500 and a new status text on every request, with maths in it: one reason, in the policy's words
    reasons = summary["failed_by_reason"]
    assert reasons["failed_to_download: http 500"] == 4 and not any("frac" in r or "Broken" in r for r in reasons)
    assert all(stable_reason(r.split(": ", 1)[1]) == r.split(": ", 1)[1] for r in reasons), reasons

    table = read_parquet(RunLayout(root).shard_parquet("00000")).to_pydict()
    by_url = {}
    for url, caption, status, message in zip(table["url"], table["caption"], table["status"], table["error_message"]):
        by_url.setdefault((url, caption), []).append(f"{status}: {message}")
    for path, caption, reason in web.cases:
        url = web.url_of(path).replace("=s3cr3t", "=REDACTED")  # the shards keep signed URLs redacted
        (outcome,) = by_url[(url, caption)]
        if reason is None:
            assert outcome.startswith("success"), (path, outcome)
        else:
            assert outcome.endswith(f": {reason}") and not outcome.startswith("success"), (path, reason, outcome)
    samples = list(iter_samples(RunLayout(root).shard_tar("00000")))
    assert len(samples) == expected_written and not any("s3cr3t" in fields["json"].decode() for _, fields in samples)
    assert "/ok/1.png?X-Amz-Signature=s3cr3t" in " ".join(web.requests)  # while the fetch used the real URL

    embedded = run_embed(EmbedConfig(batch_size=8), root, RaySession())
    assert embedded["rows_in"] == summary["written"] == embedded["written"] and not embedded["failed_shards"]
    status = run_status(root)
    assert status["problems"] == [] and status["download"]["failed"] == len(rows) - expected_written
