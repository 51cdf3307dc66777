"""A web server on 127.0.0.1 that behaves like the web at its worst, one path per misbehaviour, with the
reason each row must end up failed with (None: the row must be written)."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from tests.servers import encode


def png_header_claiming(width: int, height: int) -> bytes:
    """The signature and IHDR chunk of a PNG that says it is width x height (and nothing else)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


class WorstWeb:
    """Each case: (path, caption, expected reason fragment or None). DRIP_SECONDS bounds the drip response."""

    DRIP_SECONDS = 30

    def __init__(self):
        good = encode(Image.new("RGB", (40, 40), (200, 30, 30)))
        self.good = good
        self.cases = [
            ("/ok/1.png", "a plain good image", None),
            ("/ok/2.png", "", None),  # an empty caption is still a row
            ("/ok/3.png", "x" * 2000, None),  # a 2,000-character caption
            ("/ok/4.png", "ünïcødé ✓ 画像 \u202e rtl \u0000 nul", None),
            ("/ok/1.png", "the same URL a second time", None),  # duplicate URLs: two rows, both written
            ("/status/404", "not found", "404"),
            ("/status/403", "forbidden", "403"),
            ("/status/500", "server error", "500"),
            ("/loop", "a redirect loop", "redirect"),
            ("/drip", "one byte per second", "timed out"),
            ("/truncated", "a body shorter than its Content-Length", "truncated body"),
            ("/html", "a page, not an image", "failed_to_resize"),
            ("/huge-header.png", "a PNG header claiming 20000x20000", "image area too large"),
            ("/empty", "a zero-byte body", "failed_to_resize"),
        ]
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's name
                try:
                    server.respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path

        def send(status: int, body: bytes, length: int | None = None, headers: dict | None = None) -> None:
            handler.send_response(status)
            handler.send_header("Content-Length", str(len(body) if length is None else length))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(body)
            handler.wfile.flush()

        if path.startswith("/ok/"):
            send(200, self.good, headers={"Content-Type": "image/png"})
        elif path.startswith("/status/"):
            send(int(path.rsplit("/", 1)[-1]), b"no")
        elif path == "/loop":
            send(302, b"", headers={"Location": "/loop"})
        elif path == "/drip":  # headers at once, then one byte a second: every socket read succeeds
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(self.good)))
            handler.end_headers()
            for i in range(min(len(self.good), self.DRIP_SECONDS)):
                handler.wfile.write(self.good[i:i + 1])
                handler.wfile.flush()
                time.sleep(1)
            handler.close_connection = True
        elif path == "/truncated":
            send(200, self.good[: len(self.good) // 2], length=len(self.good))
            handler.close_connection = True
        elif path == "/html":
            send(200, b"<html><body>a page</body></html>", headers={"Content-Type": "text/html"})
        elif path == "/huge-header.png":  # the header, then a body that never ends within the deadline
            header = png_header_claiming(20000, 20000)
            handler.send_response(200)
            handler.send_header("Content-Length", str(20000 * 20000 * 3))
            handler.end_headers()
            handler.wfile.write(header)
            handler.wfile.flush()
            for _ in range(self.DRIP_SECONDS):
                handler.wfile.write(b"\0")
                handler.wfile.flush()
                time.sleep(1)
            handler.close_connection = True
        elif path == "/empty":
            send(200, b"", headers={"Content-Type": "image/png"})
        else:
            send(404, b"no")

    def rows(self) -> list[dict]:
        return [{"url": self.url + path, "caption": caption} for path, caption, _ in self.cases]

    def __enter__(self) -> "WorstWeb":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
