"""Real servers for the tests, all on 127.0.0.1: an image HTTP server and moto's S3 server."""

from __future__ import annotations

import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from pipeline.shapes import generate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


class ImageServer:
    """Serves generated shape images at /img/{i}.png plus the failure cases a real crawl meets."""

    SLOW_SECONDS = 8.0

    def __init__(self, count: int, size: int = 48, seed: int = 0):
        self.samples = list(generate(count, size=size, seed=seed))
        self.bodies = {f"/img/{i}.png": encode(img) for i, (_, img) in enumerate(self.samples)}
        jpeg = encode(self.samples[0][1], "JPEG")
        self.bodies["/truncated.jpg"] = jpeg[: len(jpeg) // 3]
        self.bodies["/not-an-image.png"] = b"<html>this is not an image</html>"
        self.bodies["/large.png"] = encode(Image.fromarray(np.full((6000, 6000, 3), 200, np.uint8)))
        self.bodies["/slow.png"] = self.bodies["/img/0.png"]
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                body = server.bodies.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if self.path == "/slow.png":
                    time.sleep(ImageServer.SLOW_SECONDS)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def rows(self, with_failures: bool = True) -> list[dict]:
        """url/caption rows: every good image, then one row per failure case."""
        rows = [{"url": f"{self.url}/img/{i}.png", "caption": spec.caption} for i, (spec, _) in enumerate(self.samples)]
        if with_failures:
            for path, caption in (("/missing.png", "a 404"), ("/not-an-image.png", "not an image"),
                                  ("/truncated.jpg", "a truncated jpeg"), ("/large.png", "a very large image"),
                                  ("/slow.png", "slower than the timeout")):
                rows.append({"url": self.url + path, "caption": caption})
        return rows
