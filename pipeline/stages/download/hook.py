"""img2dataset's downloader, made to fetch through pipeline/formats/fetch.py: the download policy, a whole-request
deadline, the size checked from the header, and the real URL of a row whose url column the shards keep redacted."""

from __future__ import annotations

import contextlib
import io
import threading
from typing import Iterator

from dalle2.faults import crash_point
from pipeline.formats.fetch import FetchPolicy, fetch, reason_of


# img2dataset's download_image gets (key, url) only: the url column it reads (and writes into the
# shards) is redacted, and the real URLs of the shard in flight are looked up here by key.
_REAL_URLS: dict[int, str] = {}
_SHARD_LOCK = threading.Lock()


@contextlib.contextmanager
def real_urls(urls: dict[int, str]) -> Iterator[None]:
    """While one shard downloads: {row index: real URL} for the rows whose url column was redacted."""
    with _SHARD_LOCK:  # one shard at a time per process (a Ray worker runs one task at a time anyway)
        _REAL_URLS.clear()
        _REAL_URLS.update(urls)
        try:
            yield
        finally:
            _REAL_URLS.clear()


def install(policy: FetchPolicy) -> None:
    """Make img2dataset's downloader fetch through `fetch` under `policy`."""
    from img2dataset import downloader

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        try:
            body = fetch(_REAL_URLS.get(key, url), policy)
        except Exception as error:  # noqa: BLE001 - the row fails with the vocabulary's reason
            return key, None, reason_of(error)
        crash_point("download.mid_shard")
        return key, io.BytesIO(body), None

    downloader.download_image = download_image
