"""Real servers for the tests, all on 127.0.0.1: an image HTTP server, and a Ray cluster of `ray start` processes."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np
from PIL import Image

from jobs.shapes import generate
from tests.ports import free_port
from tests.processes import kill_session

log = logging.getLogger(__name__)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


class ImageServer:
    """Serves generated shape images at /img/{i}.png plus the failure cases a real crawl meets."""

    SLOW_SECONDS = 8.0
    HOLD_CAP_SECONDS = 300.0  # a held answer is sent after this even if the test never releases it

    def __init__(self, count: int, size: int = 48, seed: int = 0):
        self.samples = list(generate(count, size=size, seed=seed))
        self.bodies = {f"/img/{i}.png": encode(img) for i, (_, img) in enumerate(self.samples)}
        jpeg = encode(self.samples[0][1], "JPEG")
        self.bodies["/truncated.jpg"] = jpeg[: len(jpeg) // 3]
        self.bodies["/not-an-image.png"] = b"<html>this is not an image</html>"
        self.bodies["/large.png"] = encode(Image.fromarray(np.full((6000, 6000, 3), 200, np.uint8)))
        self.bodies["/slow.png"] = self.bodies["/img/0.png"]
        self.held: frozenset = frozenset()  # paths whose answers wait until the `holding` block ends
        self.released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                body = server.bodies.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if self.path == "/slow.png":
                    time.sleep(ImageServer.SLOW_SECONDS)
                if self.path in server.held:
                    server.released.wait(timeout=ImageServer.HOLD_CAP_SECONDS)
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

    @contextlib.contextmanager
    def holding(self, urls):
        """While inside, answers for `urls` (this server's) wait (a stage's tasks stay running on them) until the
        block ends: a test acts in the middle of a stage on an event, not on how slow the web was made."""
        self.released.clear()
        self.held = frozenset(url[len(self.url):] for url in urls)
        try:
            yield
        finally:
            self.held = frozenset()
            self.released.set()

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

    def __init__(self, workers: int = 0, cpus: int = 4, head_cpus: int | None = None,
                 node_resources: list[dict] | None = None, as_local_default: bool = False,
                 lost_nodes_fast: bool = False):
        """`node_resources[i]`: the custom resources of worker node i (cluster.yaml's pools, say).
        `as_local_default`: the cluster a plain `ray start --head` makes, the one ray.init() finds on its own
        (its address file in Ray's default temp dir, here RAY_TMPDIR in `env`), instead of only by address.
        `lost_nodes_fast`: a killed node is declared dead after about 3 s, not Ray's default 15-30 s (for tests
        that kill one; elsewhere a head busy on 2 cores is not put at risk of missing its own health checks)."""
        self.as_local_default = as_local_default
        self.workers, self.cpus = workers, cpus
        self.head_cpus = cpus if head_cpus is None else head_cpus
        self.node_resources = node_resources or [{} for _ in range(workers)]
        self.ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        # as with an activated virtualenv: `python` in a job's entrypoint is this environment's
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1",
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        if lost_nodes_fast:
            self.env.update({"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                             "RAY_health_check_timeout_ms": "1000"})
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[subprocess.Popen] = []
        self.temp_dir = self.logs = ""
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.port, self.dashboard = free_port(), free_port()
        self.job_address = f"http://127.0.0.1:{self.dashboard}"  # for `ray job submit --address`
        self.address = f"127.0.0.1:{self.port}"  # for ray.init / ray.address

    def _log(self, number: int) -> str:
        return os.path.join(self.logs, f"node-{number}.log")

    def log_tail(self, number: int, chars: int = 3000) -> str:
        """The end of what `ray start` printed for node `number` (0: the head)."""
        try:
            with open(self._log(number), errors="replace") as f:
                return f.read()[-chars:]
        except OSError as error:
            return f"(no log: {error})"

    def _start(self, *args: str, cpus: int | None = None) -> None:
        with open(self._log(len(self.processes)), "wb") as output:  # the child keeps its own copy
            self.processes.append(subprocess.Popen(
                [self.ray_bin, "start", "--block", "--node-ip-address=127.0.0.1",
                 f"--num-cpus={self.cpus if cpus is None else cpus}", "--disable-usage-stats", *args,
                 # several nodes on one machine: each its own agent and metrics ports (the defaults are fixed numbers)
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=400000000"],
                env=self.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True))

    def _get_json(self, path: str):
        """The dashboard's JSON answer to GET `path` (what `ray list` / `ray job list` ask, without a `ray`
        process: one costs a second of CPU, and tests poll while the stage they watch runs); None while it does
        not answer."""
        import json
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.job_address}{path}", timeout=60) as response:
                return json.load(response)
        except (OSError, ValueError):  # not up yet, or going down
            return None

    def state(self, kind: str, *filters: str) -> list[dict]:
        """What `ray list {kind}` (nodes, tasks, actors) shows, as dicts, from the dashboard's state API.
        `filters`: "key=value" or "key!=value"; [] while the head does not answer yet."""
        import re
        import urllib.parse

        query = [("limit", "10000"), ("detail", "false")]
        for text in filters:
            key, predicate, value = re.fullmatch(r"(\w+)(!?=)(.*)", text).groups()
            query += [("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)]
        body = self._get_json(f"/api/v0/{kind}?{urllib.parse.urlencode(query)}")
        return body["data"]["result"]["result"] if body and body.get("result") else []

    def alive_nodes(self) -> int:
        return sum(node.get("state") == "ALIVE" for node in self.state("nodes"))

    def node_of(self, node_id: str) -> int:
        """The worker number (0-based, as in node_resources) of a node id; -1 for the head."""
        for node in self.state("nodes"):
            if node["node_id"] == node_id:
                marker = [name for name in node.get("resources_total", {}) if name.startswith("test_node_")]
                return int(marker[0][len("test_node_"):]) if marker else -1
        raise KeyError(node_id)

    def kill_node(self, worker: int) -> None:
        """SIGKILL worker node `worker` (its raylet and its workers: every process of its session), as a lost
        machine ends: no cleanup, no graceful drain."""
        kill_session(self.processes[1 + worker].pid)
        self.processes[1 + worker].wait()

    def __enter__(self) -> "RayCluster":
        try:
            return self._start_all()
        except BaseException:
            self.__exit__()  # never leave a half-started cluster behind
            raise

    def _start_all(self) -> "RayCluster":
        self.temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.logs = tempfile.mkdtemp(prefix="raylog")
        if self.as_local_default:
            self.env["RAY_TMPDIR"] = self.temp_dir  # Ray's default temp dir is then <RAY_TMPDIR>/ray
        temp = [] if self.as_local_default else [f"--temp-dir={self.temp_dir}"]
        # a head that exits at once lost a port it was given to another process between free_port() and its bind:
        # it is started again on new ports. One that never answers fails the test here, with its own words: a test
        # that went on would run against no cluster (ray.address=auto then joins any other Ray on the machine)
        for attempt in range(3):
            self._start("--head", f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                        "--include-dashboard=true", *temp, cpus=self.head_cpus)
            if self._came_up(0, self._head_answers, seconds=120):
                break
            if self.processes[0].poll() is None or attempt == 2:
                raise RuntimeError(f"the test's Ray head on port {self.port} did not come up in 120 s (it "
                                   f"{self._state_of(0)}):\n{self.log_tail(0)}")
            log.warning("ray start --head %s; again on new ports:\n%s", self._state_of(0), self.log_tail(0))
            self._stop_nodes()
            self.processes.clear()
            self._pick_ports()
        for resources in list(self.node_resources):
            self.add_node(resources, registered=True)
        return self

    def add_node(self, resources: dict, registered: bool = False) -> int:
        """Start one more worker node with these custom resources (also marked test_node_<number>), as an
        autoscaler replaces a lost one; returns its worker number once it is alive."""
        import json

        if not registered:
            self.node_resources.append(resources)
        number = len(self.processes) - 1
        marker = f"test_node_{number}"
        # one at a time: on two cores, raylets starting together can miss their start-up deadline
        self._start(f"--address={self.address}", f"--resources={json.dumps({**resources, marker: 1})}")
        if self._came_up(1 + number, lambda: any(n.get("state") == "ALIVE" and marker in n.get("resources_total", {})
                                                 for n in self.state("nodes")), seconds=90):
            return number
        raise RuntimeError(f"worker node {number} ({resources}) did not join the Ray cluster (it "
                           f"{self._state_of(1 + number)}):\n{self.log_tail(1 + number)}")

    def _head_answers(self) -> bool:
        """The head's node is alive and its job server answers."""
        return self.alive_nodes() >= 1 and self._get_json("/api/jobs/") is not None

    def _came_up(self, number: int, ready: Callable[[], bool], seconds: float) -> bool:
        """Whether node `number` (0: the head) is `ready()` within `seconds`; False as soon as its `ray start` exits."""
        process, deadline = self.processes[number], time.time() + seconds
        while time.time() < deadline and process.poll() is None:
            if ready():
                return True
            time.sleep(1)
        return False

    def _state_of(self, number: int) -> str:
        code = self.processes[number].poll()
        return "is running" if code is None else f"exited with {code}"

    def __exit__(self, *exc) -> None:
        if exc and exc[0] is not None and self.processes:  # the test failed: say how the head was, before its log goes
            log.warning("the test's Ray head %s; its log ends:\n%s", self._state_of(0), self.log_tail(0))
        self._stop_nodes()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        shutil.rmtree(self.logs, ignore_errors=True)

    def _stop_nodes(self) -> None:
        # every node is told to stop at once; `ray start --block` often outlives a TERM by far (30 s and more
        # a node), so what is left after a few seconds is killed: the cluster and its session folder go anyway
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            kill_session(process.pid)  # what is left of it (a worker that ignored TERM, in its own process group)
            process.wait()
