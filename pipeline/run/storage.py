"""fsspec helpers: whole-file reads and atomic writes on local paths, s3://, gs:// and memory://."""

from __future__ import annotations

import io
import json
import os
from typing import Any, Optional

import fsspec
import fsspec.asyn
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dalle2.durable import fsync_path, fsync_folder, write_atomic  # noqa: F401 - the one durable write, shared with checkpoints


def is_local(url: str) -> bool:
    """Whether `url` names the local disk (a plain path or file://)."""
    return "://" not in url or url.startswith("file://")


def absolute_root(url: str) -> str:
    """A run root every process agrees on: local paths made absolute (Ray workers do not run in the
    driver's working directory, so a relative path would name another folder there); URLs as given."""
    if not is_local(url):
        return url
    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` and the path within it."""
    return fsspec.core.url_to_fs(url)


def exists(url: str) -> bool:
    """Whether `url` exists now (object-store listings are not served from a stale cache)."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return fs.exists(path)


def list_files(folder: str, suffix: str = "") -> list[str]:
    """Full URLs of the files directly in `folder` ending with `suffix`, sorted; [] if it does not exist."""
    fs, path = filesystem(folder)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(suffix))
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in names]


def list_names(folder: str, suffix: str) -> set[str]:
    """Names of the files directly in `folder` ending with `suffix`, that suffix removed (one listing)."""
    return {url.rsplit("/", 1)[-1][: -len(suffix)] for url in list_files(folder, suffix)}


def read_many(urls: list[str]) -> dict[str, bytes | Exception]:
    """The bytes of many files of one filesystem, read concurrently (one listing's worth of GETs in flight on an
    object store); a file that cannot be read maps to its exception."""
    if not urls:
        return {}
    fs, _ = filesystem(urls[0])
    paths = [fs._strip_protocol(url) for url in urls]
    if isinstance(fs, fsspec.asyn.AsyncFileSystem):
        found = fs.cat(paths, on_error="return")
        return {url: found.get(path, FileNotFoundError(url)) for url, path in zip(urls, paths)}
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    out: dict[str, bytes | Exception] = {}
    for url, path in zip(urls, paths):  # local (and other blocking) filesystems: reads are cheap in sequence
        try:
            with (open(path, "rb") if local else fs.open(path, "rb")) as f:
                out[url] = f.read()
        except Exception as error:  # noqa: BLE001 - returned to the caller, who names the file
            out[url] = error
    return out


def read_many_json(urls: list[str]) -> dict[str, Any]:
    """JSON of many files, read concurrently; raises naming the first file that cannot be read or parsed."""
    out = {}
    for url, data in read_many(urls).items():
        if isinstance(data, Exception):
            raise OSError(f"cannot read {url}: {data}") from data
        try:
            out[url] = json.loads(data)
        except ValueError as error:
            raise ValueError(f"{url} is not JSON: {error}") from error
    return out


def fsync_files(urls: list[str]) -> None:
    """Make files another library wrote durable (each local file, then each of their folders) before a record
    names them done; object stores need nothing (a PUT is visible whole), and a file not there is left to the
    reader of the record to find."""
    folders: list[str] = []
    for url in urls:
        if not is_local(url):
            continue
        path = url[len("file://"):] if url.startswith("file://") else url
        try:
            fsync_path(path)
        except FileNotFoundError:
            continue
        folder = os.path.dirname(path) or "."
        if folder not in folders:
            folders.append(folder)
    for folder in folders:  # the files' names, created by the library, must last too
        fsync_folder(folder)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_json(url: str, value: Any) -> None:
    write_atomic(url, json.dumps(value, indent=2, sort_keys=True).encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_npy(url: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(url, buffer.getvalue())


def read_npy(url: str, mmap: bool = False) -> np.ndarray:
    """A .npy file; memory-mapped (not read whole) when local and `mmap` is set."""
    fs, path = filesystem(url)
    if mmap and isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return np.load(path, mmap_mode="r")
    return np.load(io.BytesIO(read_bytes(url)))


def embedding_column(array: np.ndarray) -> pa.FixedSizeListArray:
    """An [N, D] array as a parquet-storable column of N fixed-size lists (scratch files of embed and reorder)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(array).reshape(-1)), array.shape[1])


def embedding_array(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """The [N, D] array of an embedding_column, as `dtype`."""
    column = column.combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).astype(dtype).reshape(len(column), column.type.list_size)


def write_parquet(url: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_atomic(url, buffer.getvalue())


def read_parquet(url: str, columns: Optional[list[str]] = None) -> pa.Table:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file or folder if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
