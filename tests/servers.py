"""Real servers for the tests, all on 127.0.0.1: an image HTTP server, and a Ray cluster of `ray start` processes."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


class RayCluster:
    """A real `ray start --head` on 127.0.0.1 (own ports and temp dir) plus `workers` more nodes joining it,
    each a process group of its own that the test ends; `env` is what a client of this cluster runs with."""

    def __init__(self, workers: int = 0, cpus: int = 4):
        self.port, self.dashboard, self.workers, self.cpus = free_port(), free_port(), workers, cpus
        self.ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        # as with an activated virtualenv: `python` in a job's entrypoint is this environment's
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1",
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[subprocess.Popen] = []
        self.job_address = f"http://127.0.0.1:{self.dashboard}"  # for `ray job submit --address`
        self.address = f"127.0.0.1:{self.port}"  # for ray.init / ray.address

    def _start(self, *args: str) -> None:
        self.processes.append(subprocess.Popen(
            [self.ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
             "--disable-usage-stats", *args],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    def alive_nodes(self) -> int:
        probe = subprocess.run([self.ray_bin, "list", "nodes", "--address", self.job_address, "--format", "json"],
                               env=self.env, capture_output=True, text=True)
        if probe.returncode or not probe.stdout.lstrip().startswith("["):  # "No resource in the cluster" at first
            return 0
        import json

        return sum(node.get("state") == "ALIVE" for node in json.loads(probe.stdout))

    def __enter__(self) -> "RayCluster":
        try:
            return self._start_all()
        except BaseException:
            self.__exit__()  # never leave a half-started cluster behind
            raise

    def _start_all(self) -> "RayCluster":
        self.temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
        self._start("--head", f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                    "--include-dashboard=true", f"--temp-dir={self.temp_dir}")
        deadline = time.time() + 120
        while time.time() < deadline and (self.alive_nodes() < 1 or subprocess.run(
                [self.ray_bin, "job", "list", "--address", self.job_address], env=self.env, capture_output=True).returncode):
            time.sleep(1)
        for _ in range(self.workers):
            self._start(f"--address={self.address}")
        while time.time() < deadline and self.alive_nodes() < 1 + self.workers:
            time.sleep(1)
        if self.alive_nodes() < 1 + self.workers:
            raise RuntimeError(f"the Ray cluster did not come up with {1 + self.workers} nodes")
        return self

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
