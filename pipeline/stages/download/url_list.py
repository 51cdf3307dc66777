"""Read a URL list (csv, tsv, parquet, jsonl; any fsspec URL) as it comes, hostile: streamed in batches, never loaded
whole; each malformed row refused naming its line, or skipped and counted by reason; values over their caps refused."""

from __future__ import annotations

import io
import logging
from collections import Counter
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.run.config import DownloadConfig
from pipeline.run.layout import CAPTION, URL
from pipeline.run.redact import redact_url
from pipeline.run.storage import filesystem

log = logging.getLogger(__name__)

BATCH_ROWS = 65536
MALFORMED_CSV = "malformed row: wrong number of columns"  # reasons of rows skipped with download.skip_malformed_rows
MALFORMED_JSON = "malformed row: not a JSON object"
MALFORMED_TYPE = "malformed row: url or caption not a string"
# An unclosed quote in a csv makes one value of every line up to the next quote: such a row is counted by the
# lines it spans, so the file's lines still add up to rows + skipped.
MALFORMED_SPAN = "malformed row: a value spans lines (an unclosed quote?)"
MALFORMED_LONG = "malformed row: url over 8 KiB or caption over 64 KiB"
# Caps on one value: a URL past 8 KiB is refused by common servers and proxies anyway; a caption past 64 KiB is
# hundreds of times what a text encoder reads (CLIP keeps 77 tokens). Either is a damaged row, not data.
MAX_URL_BYTES = 8 << 10
MAX_CAPTION_BYTES = 64 << 10


class MalformedRows:
    """What a split met of malformed rows: skipped ones counted by reason, or the first one refused."""

    def __init__(self, url: str, skip: bool, url_col: str = URL, caption_col: str = CAPTION):
        self.url, self.skip = url, skip
        self.url_col, self.caption_col = url_col, caption_col
        self.skipped: Counter = Counter()
        self.first: Optional[str] = None  # the text of the first malformed row

    def csv_row(self, row) -> str:
        """pyarrow's invalid_row_handler (it gives no line number: the error looks the row up)."""
        self.first = self.first or row.text
        if self.skip:
            self.skipped[MALFORMED_CSV] += 1
            return "skip"
        return "error"

    def refuse(self, detail: str, line: Optional[int]) -> ValueError:
        """The error naming the list, the line and the way out."""
        where = f"line {line}" if line else "a row"
        fix = "quote values that hold the delimiter" if "column" in detail else "fix the line"
        return ValueError(f"download.url_list {redact_url(self.url)}: {where} is malformed ({detail}): {fix}, or set "
                          "download.skip_malformed_rows: true to skip and count such rows")


def line_of(url: str, text: str) -> Optional[int]:
    """The 1-based line of a file on which `text` first starts (streamed), or None."""
    needle = text.encode()
    if not needle:
        return None
    fs, path = filesystem(url)
    lines, carry = 0, b""
    with fs.open(path, "rb", compression="infer") as f:
        while True:
            block = f.read(1 << 22)
            data = carry + block
            at = data.find(needle)
            if at >= 0:
                return lines + data.count(b"\n", 0, at) + 1
            if not block:
                return None
            keep = max(len(needle), 1)
            lines += data.count(b"\n", 0, len(data) - keep)
            carry = data[len(data) - keep:]


def detect_format(url: str, configured: str) -> str:
    """The input format, from the config or the file's extension."""
    if configured != "auto":
        return configured
    name = url.lower().rsplit("/", 1)[-1]
    for suffix, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return fmt
    raise ValueError(f"download.url_list {redact_url(url)}: cannot tell its format from the name; "
                     "set download.input_format")


def iter_batches(url: str, fmt: str, malformed: Optional[MalformedRows] = None) -> Iterator[pa.RecordBatch]:
    """Record batches of the URL list, streamed; a malformed row is refused by line, or skipped and counted."""
    malformed = malformed or MalformedRows(url, skip=False)
    fs, path = filesystem(url)
    with fs.open(path, "rb", compression="infer") as f:
        if fmt in ("csv", "tsv"):
            options = pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True,
                                          invalid_row_handler=malformed.csv_row)
            convert = pa_csv.ConvertOptions(strings_can_be_null=False, column_types={
                malformed.url_col: pa.string(), malformed.caption_col: pa.string()})
            try:
                yield from pa_csv.open_csv(f, parse_options=options, convert_options=convert,
                                           read_options=pa_csv.ReadOptions(block_size=1 << 22))
            except pa.ArrowInvalid as error:
                if malformed.first is None:  # another parse error (an unclosed quote): name the file at least
                    raise ValueError(f"download.url_list {redact_url(url)}: {str(error).splitlines()[0][:200]}") from None
                raise malformed.refuse(str(error).split(":", 2)[1].strip() if str(error).count(":") >= 2 else
                                       "wrong number of columns", line_of(url, malformed.first)) from None
        elif fmt == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
        else:
            # pyarrow's json reader reads the whole file; jsonl lists are read in blocks of whole lines instead.
            carry, lines = b"", 0
            while True:
                block = f.read(1 << 22)
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if data[:cut].strip():
                    yield from _json_block(data[:cut], lines, malformed)
                lines += data.count(b"\n", 0, cut)
                carry = data[cut:]
                if not block:
                    break


def _json_block(data: bytes, lines_before: int, malformed: MalformedRows) -> Iterator[pa.RecordBatch]:
    """A block of whole jsonl lines; on a parse error, line by line, to name (or skip) the bad ones."""
    import json

    try:
        table = pa_json.read_json(io.BytesIO(data))
        if _json_types_ok(table, malformed):
            yield from table.to_batches()
            return
    except pa.ArrowInvalid:
        pass  # (mixed types in a column, or a line that is not JSON)
    rows = []
    for number, line in enumerate(data.split(b"\n"), start=lines_before + 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if not malformed.skip:
                raise malformed.refuse("not a JSON object", number) from None
            malformed.skipped[MALFORMED_JSON] += 1
            continue
        if not isinstance(row.get(malformed.url_col), str) or not isinstance(row.get(malformed.caption_col),
                                                                              (str, type(None))):
            if not malformed.skip:
                raise malformed.refuse(f"{malformed.url_col!r} or {malformed.caption_col!r} is missing or not a "
                                       "string", number) from None
            malformed.skipped[MALFORMED_TYPE] += 1
            continue
        rows.append(row)
    if rows:
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:  # an extra column of mixed types
            raise ValueError(f"download.url_list {redact_url(malformed.url)}: lines {lines_before + 1}-{number}: "
                             f"{str(error).splitlines()[0][:200]}") from None
        yield from table.to_batches()


def _json_types_ok(table: pa.Table, malformed: MalformedRows) -> bool:
    """Whether a block read whole has a url column of strings with no nulls and a caption of strings (or nulls);
    if not, the block is read line by line to name the rows at fault."""
    names = table.schema.names
    if malformed.url_col in names:
        url = table.column(malformed.url_col)
        if not pa.types.is_string(url.type) or url.null_count:
            return False
    if malformed.caption_col in names:
        kind = table.column(malformed.caption_col).type
        if not (pa.types.is_string(kind) or pa.types.is_null(kind)):
            return False
    return True


def select_columns(batch: pa.RecordBatch, config: DownloadConfig, source: str) -> pa.Table:
    """The url, caption and extra columns of a batch, renamed to the pipeline's names, as strings."""
    wanted = {config.url_col: URL, config.caption_col: CAPTION, **{c: c for c in config.save_additional_columns}}
    missing = [c for c in wanted if c not in batch.schema.names]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} not found; it has {batch.schema.names} "
                         f"(set download.url_col / caption_col / save_additional_columns)")
    for column, nulls_ok in ((config.url_col, False), (config.caption_col, True)):
        kind = batch.schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or (nulls_ok and pa.types.is_null(kind))):
            raise ValueError(f"{source}: column {column!r} holds {kind}, not strings (download.url_col / caption_col "
                             "must name text columns)")
    columns = [batch.column(c).cast(pa.string()) for c in wanted]
    return pa.table(columns, names=list(wanted.values()))


def check_values(table: pa.Table, fmt: str, malformed: MalformedRows) -> pa.Table:
    """The rows whose url has no nulls, no line break and fits its cap, and whose caption fits its cap (and, in a
    csv, holds no line break); any other row is refused by its line or, skipping, counted."""
    import pyarrow.compute as pc

    url, caption = table.column(URL), table.column(CAPTION)
    spans = pc.or_(pc.match_substring(url, "\n"), pc.match_substring(url, "\r"))
    if fmt in ("csv", "tsv"):  # (a JSON string holds an escaped line break on one line: no quote went astray)
        spans = pc.or_kleene(spans, pc.fill_null(pc.match_substring(caption, "\n"), False))
    long = pc.or_(pc.greater(pc.binary_length(url), MAX_URL_BYTES),
                  pc.fill_null(pc.greater(pc.binary_length(caption), MAX_CAPTION_BYTES), False))
    bad = pc.or_(pc.fill_null(pc.or_(spans, long), True), pc.is_null(url))
    if not pc.any(bad).as_py():
        return table
    rows = table.filter(bad).to_pylist()
    if not malformed.skip:
        row = rows[0]
        value = next((v for v in (row[URL], row[CAPTION]) if v and ("\n" in v or len(v) > MAX_URL_BYTES)), "")
        detail = "a value spans lines: an unclosed quote?" if "\n" in value else \
            f"url over {MAX_URL_BYTES} or caption over {MAX_CAPTION_BYTES} bytes"
        first = value.split("\n", 1)[0]
        # a value spanning lines was quoted: its opening quote and first line's end pin the line down (its first
        # line alone, "a", would be found on some earlier line)
        needle = f'"{first}\n' if "\n" in value and len(first) < 200 else first[:200]
        raise malformed.refuse(detail, line_of(malformed.url, needle) or line_of(malformed.url, first[:200]))
    for row, spanning in zip(rows, pc.filter(spans, bad).to_pylist()):
        if spanning:
            malformed.skipped[MALFORMED_SPAN] += 1 + sum(str(v).count("\n") for v in row.values() if v)
        else:
            malformed.skipped[MALFORMED_LONG] += 1
    return table.filter(pc.invert(bad))
