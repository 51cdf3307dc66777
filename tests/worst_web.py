"""A web server on 127.0.0.1 that behaves like the web at its worst, one path per misbehaviour, with the
reason each row must end up failed with (None: the row must be written), and the hostile URLs a list can
hold that no server of ours answers (file://, ftp://, data:, the cloud metadata service)."""

from __future__ import annotations

import itertools
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
    METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"

    def __init__(self):
        good = encode(Image.new("RGB", (40, 40), (200, 30, 30)))
        self.good = good
        # a JPEG whose frame size comes after 1.1 MB of APP2 segments (served, not in `cases`)
        jpeg = encode(Image.new("RGB", (40, 40), (30, 30, 200)), "JPEG")
        self.late_size = jpeg[:2] + (b"\xff\xe2" + struct.pack(">H", 65535) + bytes(65533)) * 17 + jpeg[2:]
        self.cases = [
            ("/ok/1.png", "a plain good image", None),
            ("/ok/2.png", "", None),  # an empty caption is still a row
            ("/ok/3.png", "x" * 2000, None),  # a 2,000-character caption
            ("/ok/4.png", "ünïcødé ✓ 画像 \u202e rtl \u0000 nul", None),
            ("/ok/1.png", "the same URL a second time", None),  # duplicate URLs: two rows, both written
            ("/status/404", "not found", "http 404"),
            ("/status/403", "forbidden", "http 403"),
            ("/status/500", "server error", "http 500"),
            ("/loop", "a redirect loop", "too many redirects"),
            ("/drip", "one byte per second", "timed out"),
            ("/truncated", "a body shorter than its Content-Length", "truncated body"),
            ("/html", "a page, not an image", "refused: image size not in its header"),
            ("/huge-header.png", "a PNG header claiming 20000x20000", "too large: max_image_area"),
            ("/empty", "a zero-byte body", "refused: image size not in its header"),
            ("/huge-length.png", "a Content-Length of 10 GiB", "too large: max_bytes"),
            ("/endless.png", "a small PNG header, then zeros for ever (/dev/zero)", "too large: max_bytes"),
            ("/noai.png", "X-Robots-Tag: noai", "opted out: noai"),
            ("/noimageai-for-us.png", "X-Robots-Tag: dalle2-test: noimageai", "opted out: noimageai"),
            ("/noai-for-others.png", "X-Robots-Tag: otherbot: noai (not us)", None),
            ("/status-text/1", "a 500 whose status text changes every time", "http 500"),
            ("/status-text/2", "and again", "http 500"),
            ("/status-text/3", "and again", "http 500"),
            ("/redirect/ok", "a redirect to a good image", None),
            ("/redirect/metadata", "a redirect to the metadata service", "refused: link-local or metadata address"),
            ("/redirect/file", "a redirect to file:///etc/hostname", "refused: scheme file"),
            ("/ok/1.png?X-Amz-Signature=s3cr3t&X-Amz-Date=1&sig=s3cr3t", "a signed URL", None),
            ("file:///etc/hostname", "a local file", "refused: scheme file"),
            ("file:///dev/zero", "an endless local file", "refused: scheme file"),
            ("ftp://127.0.0.1/a.png", "ftp", "refused: scheme ftp"),
            ("data:image/png;base64,iVBORw0KGgo=", "a data: URL", "refused: scheme data"),
            (self.METADATA, "the cloud metadata service", "refused: link-local or metadata address"),
            ("http://[fd00:ec2::254]/latest/meta-data/", "AWS metadata over IPv6", "refused: link-local or metadata address"),
            ("http://100.100.100.200/latest/meta-data/", "Alibaba's metadata service", "refused: link-local or metadata address"),
        ]
        self.status_texts = itertools.count()
        self.requests: list[str] = []  # every path asked for, in order
        self.headers: list[dict] = []  # and the request headers of each
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
        self.requests.append(path)
        self.headers.append(dict(handler.headers))

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
        elif path == "/huge-header.png":  # the header, then a body with no length that never ends in time
            header = png_header_claiming(20000, 20000)
            handler.send_response(200)
            handler.send_header("Connection", "close")
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
        elif path == "/huge-length.png":  # a length far past max_bytes, then the body as fast as it goes
            handler.send_response(200)
            handler.send_header("Content-Length", str(10 << 30))
            handler.end_headers()
            self.stream_zeros(handler, png_header_claiming(40, 40))
        elif path == "/endless.png":  # no length: zeros until the client hangs up
            handler.send_response(200)
            handler.send_header("Connection", "close")
            handler.end_headers()
            self.stream_zeros(handler, png_header_claiming(40, 40))
        elif path == "/late-size.jpg":
            send(200, self.late_size, headers={"Content-Type": "image/jpeg"})
        elif path == "/drip-close":  # no length, the server closes at the end: a byte every 1.8 s (served only)
            handler.send_response(200)
            handler.send_header("Connection", "close")
            handler.end_headers()
            for i in range(10):
                handler.wfile.write(self.good[i:i + 1])
                handler.wfile.flush()
                time.sleep(1.8)
            handler.close_connection = True
        elif path == "/noai.png":
            send(200, self.good, headers={"X-Robots-Tag": "noarchive, NoAI"})
        elif path == "/noimageai-for-us.png":
            send(200, self.good, headers={"X-Robots-Tag": "dalle2-test: noimageai"})
        elif path == "/noai-for-others.png":
            send(200, self.good, headers={"X-Robots-Tag": "otherbot: noai"})
        elif path.startswith("/status-text/"):  # a new status text every time, with maths a plot would parse
            handler.send_response(500, f"Broken #{next(self.status_texts)} $\\frac{{1}}{{0}}$")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif path.startswith("/sized/"):  # a PNG header and zeros, N bytes in all, no length (served only)
            size = int(path.rsplit("/", 1)[1])
            handler.send_response(200)
            handler.send_header("Connection", "close")
            handler.end_headers()
            head = png_header_claiming(40, 40)
            handler.wfile.write(head + bytes(size - len(head)))
            handler.close_connection = True
        elif path.startswith("/odd-scheme/"):  # a new scheme on every redirect (served only)
            send(302, b"", headers={"Location": f"pwn{path.rsplit('/', 1)[1]}x:/"})
        elif path.startswith("/redirect/"):
            target = {"ok": "/ok/1.png", "metadata": self.METADATA, "file": "file:///etc/hostname"}[path.rsplit("/", 1)[1]]
            send(302, b"", headers={"Location": target})
        else:
            send(404, b"no")

    @staticmethod
    def stream_zeros(handler: BaseHTTPRequestHandler, head: bytes) -> None:
        """`head`, then zeros as fast as the client reads, until it hangs up (or 1 GiB: a broken client)."""
        handler.wfile.write(head)
        block = bytes(1 << 16)
        try:
            for _ in range(1 << 14):
                handler.wfile.write(block)
        except OSError:
            pass
        handler.close_connection = True

    def url_of(self, path: str) -> str:
        return self.url + path if path.startswith("/") else path

    def rows(self) -> list[dict]:
        return [{"url": self.url_of(path), "caption": caption} for path, caption, _ in self.cases]

    def __enter__(self) -> "WorstWeb":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class SlowHead:
    """A raw TCP server on 127.0.0.1 for one connection that misbehaves below HTTP's body, where http.client's
    per-read timeout never fires: `headers` drips the status line and headers a byte every DRIP seconds,
    `chunked` drips a chunk-size line, `tls` a TLS handshake record (after the ClientHello), `continue` sends `100 Continue` heads as fast as they are read.
    After the client hangs up (or the server gives up, after LIMIT_SECONDS or LIMIT_BYTES), `open_for`
    is how long the connection stayed open and `sent` the bytes the server managed to send."""

    DRIP = 0.2
    LIMIT_SECONDS = 20.0
    LIMIT_BYTES = 64 << 20

    def __init__(self, mode: str):
        import socket

        self.mode, self.open_for, self.sent = mode, None, 0
        self.done = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/a.png"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        started = time.monotonic()
        connection.settimeout(self.LIMIT_SECONDS)  # a client that neither reads nor hangs up
        try:
            connection.recv(65536)  # the request
            if self.mode == "continue":
                block = b"HTTP/1.1 100 Continue\r\n\r\n" * 1000
                while self.sent < self.LIMIT_BYTES and time.monotonic() - started < self.LIMIT_SECONDS:
                    connection.sendall(block)
                    self.sent += len(block)
            else:
                head = b"" if self.mode == "tls" else b"HTTP/1.1 200 OK\r\n" + (
                    b"Transfer-Encoding: chunked\r\n\r\n" if self.mode == "chunked" else b"")
                connection.sendall(head)
                self.sent += len(head)
                filler = {"chunked": b"0", "tls": b"\x16\x03\x03\x40\x00" + bytes(16384)}.get(
                    self.mode, b"X-Pad: " + b"a" * 1000)
                for i in itertools.count():
                    if time.monotonic() - started > self.LIMIT_SECONDS:
                        break
                    connection.sendall(filler[i % len(filler):][:1])
                    self.sent += 1
                    time.sleep(self.DRIP)
        except OSError:  # the client hung up
            pass
        finally:
            self.open_for = time.monotonic() - started
            connection.close()
            self.listener.close()
            self.done.set()
