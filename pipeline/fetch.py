"""One image request, as img2dataset's `download_image` makes it, with two limits the web needs:

- a whole-request deadline: urllib's `timeout` bounds each socket read, so a server that sends one
  byte a second never times out; here the body is read in chunks against one deadline;
- an early size check: the image header is parsed as soon as it has arrived, and an image whose
  width x height exceeds `max_image_area` fails before its body is read or decoded.

`install(...)` makes img2dataset's downloader use it (img2dataset looks `download_image` up in its
module at call time, and has no hook for either limit).
"""

from __future__ import annotations

import io
import time
import urllib.request
from typing import Optional

from .faults import crash_point

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
CHUNK = 1 << 16
HEADER_PROBE_LIMIT = 1 << 20  # give up parsing the size after this many bytes (img2dataset checks it later)


class RequestTimeout(TimeoutError):
    """The whole request took longer than its deadline."""


def image_area(head: bytes) -> Optional[int]:
    """width x height from the first bytes of an encoded image, or None if they do not tell (yet)."""
    import struct

    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])  # IHDR comes first, at a fixed offset
        return width * height
    if head[:2] == b"\xff\xd8":
        return _jpeg_area(head)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(head)) as image:  # parses the header only; decodes nothing
            width, height = image.size
        return width * height
    except Image.DecompressionBombError:  # PIL refuses images over twice its pixel limit: at least that
        return 2 * Image.MAX_IMAGE_PIXELS + 1
    except Exception:  # noqa: BLE001 - not enough bytes yet, or not an image (the resizer says which)
        return None


def _jpeg_area(head: bytes) -> Optional[int]:
    """The frame size of a JPEG from its SOF marker (after any EXIF), or None if it has not arrived."""
    import struct

    i = 2
    while i + 9 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", head[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            height, width = struct.unpack(">HH", head[i + 5:i + 9])
            return width * height
        i += 2 + length
    return None


def fetch(url: str, timeout: float, max_image_area: float) -> bytes:
    """The body of `url`, within `timeout` seconds in all; raises with a reason otherwise."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, data=None, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        chunks, size, area_known = [], 0, False
        while True:
            if time.monotonic() > deadline:
                raise RequestTimeout(f"timed out: no whole body within {timeout:g} s")
            chunk = response.read1(CHUNK)  # what the socket has now (at most one read of `timeout`)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if not area_known and size <= HEADER_PROBE_LIMIT:
                area = image_area(b"".join(chunks))
                if area is not None:
                    area_known = True
                    if area > max_image_area:
                        raise ValueError("image area too large")
        missing = getattr(response, "length", None)  # http(s) only: file:// and data: URLs have no length
        if missing:  # the server closed before its Content-Length: a truncated body
            raise ValueError(f"truncated body: {size} of {size + missing} bytes")
        return b"".join(chunks)


def install(max_image_area: float) -> None:
    """Make img2dataset's downloader fetch through `fetch`, with `max_image_area` as the area limit."""
    from img2dataset import downloader

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        try:
            body = fetch(url, timeout, max_image_area)
        except Exception as error:  # noqa: BLE001 - img2dataset records the message as the row's error
            return key, None, str(error) or type(error).__name__
        crash_point("download.mid_shard")
        return key, io.BytesIO(body), None

    downloader.download_image = download_image
