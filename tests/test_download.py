"""The download stage against a real HTTP server on 127.0.0.1, on a real local Ray."""

import json

import pandas as pd
import pytest

from pipeline.execution.session import RaySession
from pipeline.run.config import DownloadConfig
from pipeline.stages.download.stage import run_download
from pipeline.run.layout import RunLayout, parse_key
from pipeline.stages.download.split import split_url_list
from pipeline.formats.shard_reader import iter_samples


def write_url_list(rows, path, fmt):
    df = pd.DataFrame(rows).rename(columns={"url": "URL", "caption": "TEXT"})
    df["source"] = "test"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "parquet":
        df.to_parquet(path)
    else:
        df.to_json(path, orient="records", lines=True)
    return str(path)


def config(url_list, **overrides):
    fields = dict(url_list=url_list, url_col="URL", caption_col="TEXT", save_additional_columns=["source"],
                  image_size=32, samples_per_shard=20, threads=8, timeout=4.0, max_image_area=2e7,
                  allow_private_network=True)  # the image server is on 127.0.0.1
    return DownloadConfig(**{**fields, **overrides})


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_reader_splits_every_format(tmp_path, image_server, fmt):
    rows = image_server.rows()
    url_list = write_url_list(rows, tmp_path / f"urls.{fmt}", fmt)
    shards = split_url_list(config(url_list), RunLayout(str(tmp_path / "run")))
    assert list(shards) == ["00000", "00001", "00002", "00003"] and sum(shards.values()) == len(rows)
    assert split_url_list(config(url_list), RunLayout(str(tmp_path / "run"))) == shards  # reused, not redone


def test_reader_names_a_missing_column(tmp_path, image_server):
    url_list = write_url_list(image_server.rows(), tmp_path / "urls.csv", "csv")
    with pytest.raises(ValueError, match=r"urls.csv: column\(s\) \['link'\] not found"):
        split_url_list(config(url_list, url_col="link"), RunLayout(str(tmp_path / "run")))


def test_download_accounts_for_every_row(tmp_path, image_server, ray_local):
    rows = image_server.rows()
    url_list = write_url_list(rows, tmp_path / "urls.csv", "csv")
    root = str(tmp_path / "run")
    summary = run_download(config(url_list), root, RaySession())

    assert summary["rows_in"] == summary["input_rows"] == len(rows) == 65
    assert summary["written"] + summary["failed"] == len(rows)
    assert summary["written"] == 60 and not summary["failed_shards"]
    reasons = summary["failed_by_reason"]
    assert any("404" in r for r in reasons) and any("timed out" in r for r in reasons)
    assert sum(reasons.values()) == 5, reasons

    layout = RunLayout(root)
    keys = []
    for shard in summary["per_shard"]:
        samples = list(iter_samples(layout.shard_tar(shard)))
        assert len(samples) == summary["per_shard"][shard]["written"]
        for key, fields in samples:
            assert parse_key(key, 2)[0] == int(shard) and fields["txt"] and "jpg" in fields
            assert json.loads(fields["json"])["source"] == "test"  # extra columns are kept as metadata
            keys.append(key)
    assert len(set(keys)) == 60
    ledger = json.loads((tmp_path / "run" / "ledger" / "download.json").read_text())
    assert ledger["written"] == 60

    again = run_download(config(url_list), root, RaySession())  # everything done: nothing is redone or duplicated
    assert again["written"] == 60 and again["rows_in"] == 65


def test_a_malformed_line_is_named_or_skipped_and_counted(tmp_path, image_server):
    from jobs.status import run_status

    rows = image_server.rows(with_failures=False)[:6]
    lines = ["URL,TEXT,source"] + [f"{r['url']},{r['caption']},test" for r in rows]
    lines.insert(4, f"{rows[0]['url']},an unquoted, comma,test")  # line 5 of the file
    url_list = tmp_path / "urls.csv"
    url_list.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"urls.csv: line 5 is malformed \(Expected 3 columns, got 4\).*"
                                         r"download.skip_malformed_rows"):
        split_url_list(config(str(url_list)), RunLayout(str(tmp_path / "refused")))

    root = str(tmp_path / "run")
    summary = run_download(config(str(url_list), skip_malformed_rows=True, distributor="local"), root, RaySession())
    assert summary["input_rows_skipped"] == {"malformed row: wrong number of columns": 1}
    assert summary["input_rows"] == 7 and summary["rows_in"] == summary["written"] == 6
    assert run_status(root)["problems"] == []


def test_status_finds_skipped_rows_that_do_not_add_up(tmp_path):
    from jobs.status import reconcile

    download = {"shards": 1, "rows_in": 6, "written": 6, "failed": 0, "failed_shards": {}, "input_rows": 8,
                "input_rows_skipped": {"malformed row: wrong number of columns": 1}}
    assert reconcile({"download": download}) == ["download: 8 input rows but 6 rows recorded and 1 skipped as malformed"]
    download["input_rows"] = 7
    assert reconcile({"download": download}) == []


def test_a_shards_outputs_are_fsynced_before_its_ledger_record(tmp_path, image_server, monkeypatch):
    import os

    from pipeline.stages.download.stage import ShardDownloader

    rows = image_server.rows(with_failures=False)[:4]
    url_list = write_url_list(rows, tmp_path / "urls.csv", "csv")
    root = str(tmp_path / "run")
    download = config(url_list)
    split_url_list(download, RunLayout(root))
    os.makedirs(RunLayout(root).shards)  # (run_download makes it: img2dataset's writer does not)
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), root))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    record = ShardDownloader(download, root)("00000")
    assert record.written == 4
    ledger = next(i for i, path in enumerate(calls) if path.startswith("ledger/download/") and ".tmp-" in path)
    for output in ("shards/00000.tar", "shards/00000.parquet", "shards/00000_stats.json", "shards"):
        assert output in calls[:ledger], (output, calls)  # on disk, names included, before the record says done
