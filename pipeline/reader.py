"""Split a URL list (csv, tsv, parquet, jsonl; any fsspec URL) into the download stage's input shards.

The list is streamed in batches, never loaded whole. Each shard's rows are written as an Arrow IPC
file (what img2dataset's downloader reads); `inputs/_SUCCESS.json`, written last, lists the shards,
so a re-run reuses the same split.
"""

from __future__ import annotations

import io
import logging
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from .config import DownloadConfig
from .layout import CAPTION, URL, RunLayout, shard_name
from .ledger import StaleRunError
from .storage import exists, filesystem, list_files, read_json, write_atomic, write_json

log = logging.getLogger(__name__)

BATCH_ROWS = 65536


def detect_format(url: str, configured: str) -> str:
    """The input format, from the config or the file's extension."""
    if configured != "auto":
        return configured
    name = url.lower().rsplit("/", 1)[-1]
    for suffix, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return fmt
    raise ValueError(f"download.url_list {url}: cannot tell its format from the name; set download.input_format")


def iter_batches(url: str, fmt: str) -> Iterator[pa.RecordBatch]:
    """Record batches of the URL list, streamed."""
    fs, path = filesystem(url)
    with fs.open(path, "rb", compression="infer") as f:
        if fmt in ("csv", "tsv"):
            options = pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
            convert = pa_csv.ConvertOptions(strings_can_be_null=False)
            reader = pa_csv.open_csv(f, parse_options=options, convert_options=convert,
                                     read_options=pa_csv.ReadOptions(block_size=1 << 22))
            yield from reader
        elif fmt == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
        else:
            # pyarrow's json reader reads the whole file; jsonl lists are read in blocks of whole lines instead.
            carry = b""
            while True:
                block = f.read(1 << 22)
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if data[:cut].strip():
                    yield from pa_json.read_json(io.BytesIO(data[:cut])).to_batches()
                carry = data[cut:]
                if not block:
                    break


def select_columns(batch: pa.RecordBatch, config: DownloadConfig, source: str) -> pa.Table:
    """The url, caption and extra columns of a batch, renamed to the pipeline's names, as strings."""
    wanted = {config.url_col: URL, config.caption_col: CAPTION, **{c: c for c in config.save_additional_columns}}
    missing = [c for c in wanted if c not in batch.schema.names]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} not found; it has {batch.schema.names} "
                         f"(set download.url_col / caption_col / save_additional_columns)")
    columns = [batch.column(c).cast(pa.string()) for c in wanted]
    return pa.table(columns, names=list(wanted.values()))


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
    return {"url_list": config.url_list, "url_list_size": fs.size(path), "url_list_head_sha256": head,
            "samples_per_shard": config.samples_per_shard}


def split_url_list(config: DownloadConfig, layout: RunLayout) -> dict[str, int]:
    """Shard names of the run's inputs with their row counts, splitting the URL list on first use; a split
    made from another list or shard size is refused (its shards would not be this config's)."""
    done_marker = f"{layout.inputs}/_SUCCESS.json"
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
                log.warning("download: input shards %s are missing: splitting %s again", missing[:10], config.url_list)
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

    for batch in iter_batches(config.url_list, fmt):
        pending.append(select_columns(batch, config, config.url_list))
        pending_rows += batch.num_rows
        while pending_rows >= per_shard:
            flush(per_shard)
    if pending_rows:
        flush(pending_rows)
    if not shards:
        raise ValueError(f"download.url_list {config.url_list} has no rows")
    write_json(done_marker, {**url_list_identity(config), "shards": shards})
    log.info("split %s into %d shards (%d rows)", config.url_list, len(shards), sum(shards.values()))
    return shards
