"""Split a URL list (csv, tsv, parquet, jsonl; any fsspec URL) into the download stage's input shards.

The list is streamed in batches, never loaded whole. Each shard's rows are written as an Arrow IPC
file (what img2dataset's downloader reads); `inputs/_SUCCESS.json`, written last, lists the shards,
so a re-run reuses the same split.
"""

from __future__ import annotations

import io
import logging

import pyarrow as pa

from pipeline.run.config import DownloadConfig
from pipeline.run.layout import RunLayout, shard_name
from pipeline.run.ledger import StaleRunError
from pipeline.run.redact import redact_url
from pipeline.run.storage import exists, filesystem, list_files, read_json, write_atomic, write_json
from pipeline.stages.download.url_list import MalformedRows, check_values, detect_format, iter_batches, select_columns

log = logging.getLogger(__name__)


def write_shard(layout: RunLayout, name: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    with pa.ipc.new_file(buffer, table.schema) as writer:
        writer.write_table(table)
    write_atomic(layout.input_shard(name), buffer.getvalue())


def url_list_identity(config: DownloadConfig) -> dict:
    """What the split depends on: the list's URL, size and first MiB (its content, cheaply), and the shard size."""
    import hashlib

    fs, path = filesystem(config.url_list)
    with fs.open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"url_list": redact_url(config.url_list), "url_list_size": fs.size(path), "url_list_head_sha256": head,
            "samples_per_shard": config.samples_per_shard}


def split_url_list(config: DownloadConfig, layout: RunLayout) -> dict[str, int]:
    """Shard names of the run's inputs with their row counts, splitting the URL list on first use; a split
    made from another list or shard size is refused (its shards would not be this config's)."""
    done_marker = layout.split_marker
    if exists(done_marker):
        split = read_json(done_marker)
        listed = {url.rsplit("/", 1)[-1][: -len(".arrow")] for url in list_files(layout.inputs, ".arrow")}
        missing = sorted(set(split["shards"]) - listed)
        if config.url_list and exists(config.url_list):  # (a list gone since: the split still stands)
            now = url_list_identity(config)
            changed = [f"{k} was {split[k]!r}, now {v!r}" for k, v in now.items() if k in split and split[k] != v]
            if changed:
                raise StaleRunError(f"download: {layout.inputs} was split from another URL list or shard size "
                                    f"({'; '.join(changed)}): use a new root, or delete {layout.root} to start over")
            if missing:  # lost (older versions let img2dataset delete them): the same list splits the same way
                log.warning("download: input shards %s are missing: splitting %s again", missing[:10],
                            redact_url(config.url_list))
                split = None
        if split is not None:
            return split["shards"]  # (a missing input of an unfinished shard then fails that shard, with the reason)
    if not config.url_list:
        raise ValueError("download.url_list is not set and the run has no inputs yet")
    return _split(config, layout, done_marker)


def _split(config: DownloadConfig, layout: RunLayout, done_marker: str) -> dict[str, int]:
    fmt = detect_format(config.url_list, config.input_format)
    per_shard = config.samples_per_shard
    shards: dict[str, int] = {}
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush(rows: int) -> None:
        nonlocal pending, pending_rows
        table = pa.concat_tables(pending).combine_chunks()
        head, rest = table.slice(0, rows), table.slice(rows)
        name = shard_name(len(shards))
        write_shard(layout, name, head)
        shards[name] = head.num_rows
        pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    malformed = MalformedRows(config.url_list, config.skip_malformed_rows, config.url_col, config.caption_col)
    for batch in iter_batches(config.url_list, fmt, malformed):
        table = check_values(select_columns(batch, config, redact_url(config.url_list)), fmt, malformed)
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= per_shard:
            flush(per_shard)
    if pending_rows:
        flush(pending_rows)
    if not shards:
        raise ValueError(f"download.url_list {redact_url(config.url_list)} has no rows")
    skipped = dict(malformed.skipped)
    write_json(done_marker, {**url_list_identity(config), "shards": shards, "input_rows_skipped": skipped})
    log.info("split %s into %d shards (%d rows)", redact_url(config.url_list), len(shards), sum(shards.values()))
    if skipped:
        log.warning("split %s: skipped malformed rows %s (download.skip_malformed_rows)", redact_url(config.url_list),
                    skipped)
    return shards
