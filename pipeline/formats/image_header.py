"""An encoded image's size from its first bytes (PNG, GIF, BMP, WebP, JPEG), so a too large one is refused before its
body is read or decoded."""

from __future__ import annotations

import io
from typing import Optional


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


# The two calls a test replaces to count lookups and connections (nothing else in this module resolves or connects).
