"""`dalle2 serve`: the limits on their own, then the service on the demo's trained run through Ray Serve: its API,
its refusals, and its page in headless Chromium."""

import asyncio
import base64
import io
import json
import os
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from jobs.service.limits import BodyLimit, RateLimit


def test_the_rate_limit_admits_a_burst_then_one_request_per_interval_per_client():
    now = [0.0]
    limit = RateLimit(per_minute=6, clients=2, clock=lambda: now[0])
    assert [limit.take("a") for _ in range(6)] == [0.0] * 6  # a burst of a minute's worth
    assert limit.take("a") == pytest.approx(10.0)  # then one every 10 s
    assert limit.take("b") == 0.0  # another client has its own bucket
    now[0] = 10.0
    assert limit.take("a") == 0.0 and limit.take("a") == pytest.approx(10.0)
    limit.take("c")  # over `clients` addresses: the least recent is forgotten
    assert set(limit.buckets) == {"a", "c"}


def asgi(app, body_chunks: list[bytes], headers: list) -> tuple[int, bytes, int]:
    """Call an ASGI app with a body sent in chunks: (status, response body, bytes the app read)."""
    sent, read = [], [0]
    chunks = list(body_chunks)

    async def receive():
        chunk = chunks.pop(0) if chunks else b""
        read[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "headers": headers}, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), read[0]


def test_a_body_over_the_limit_gets_413_whether_declared_or_streamed_and_is_never_read_whole():
    async def echo(scope, receive, send):  # reads the whole body, as a JSON endpoint does
        body = b""
        while True:
            message = await receive()
            body += message["body"]
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    app = BodyLimit(echo, max_bytes=1000)
    assert asgi(app, [b"x" * 600, b"x" * 300], [])[:2] == (200, b"900")
    status, body, read = asgi(app, [b"x" * 600] * 100, [])  # chunked, no length: stopped at the second chunk
    assert status == 413 and "serve.max_body_bytes" in json.loads(body)["detail"] and read == 1200
    status, _, read = asgi(app, [b"x" * 10], [(b"content-length", b"5000")])  # declared: refused unread
    assert status == 413 and read == 0
    assert asgi(app, [b"x"], [(b"content-length", b"-1")])[0] == 413


def test_a_chunked_body_over_the_limit_gets_413_from_a_fastapi_endpoint_too():
    """FastAPI turns an exception raised while it reads a body into 400: the limit answers 413 itself."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Body(BaseModel):
        text: str

    api = FastAPI()

    @api.post("/api/echo")
    async def echo(body: Body) -> dict:
        return {"length": len(body.text)}

    def call(app, chunks):
        sent, pending = [], list(chunks)

        async def receive():
            chunk = pending.pop(0) if pending else b""
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/api/echo", "raw_path": b"/api/echo", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5), "root_path": ""}
        asyncio.run(app(scope, receive, send))
        starts = [m for m in sent if m["type"] == "http.response.start"]
        assert len(starts) == 1  # one answer, never a second after the 413
        return starts[0]["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    limited = BodyLimit(api, max_bytes=100)
    assert call(limited, [b'{"text": "', b"x" * 20, b'"}']) == (200, b'{"length":20}')
    status, body = call(limited, [b'{"text": "', b"x" * 60, b"x" * 60, b'"}'])
    assert status == 413 and "serve.max_body_bytes" in json.loads(body)["detail"]


def test_the_rate_limit_answers_429_before_the_body_is_read_and_counts_api_paths_only():
    from jobs.service.limits import RateLimited

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = RateLimited(app, RateLimit(per_minute=2, clock=lambda: 0.0))

    def status(path: str, client: str = "10.0.0.1") -> int:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            raise AssertionError("the body is never read before the rate is checked")

        asyncio.run(limited({"type": "http", "path": path, "client": (client, 1), "headers": []}, receive, send))
        start = sent[0]
        if start["status"] == 429:
            assert dict(start["headers"])[b"retry-after"] == b"30"
        return start["status"]

    assert [status("/api/generate") for _ in range(3)] == [200, 200, 429]
    assert status("/") == 200 and status("/page.js") == 200  # the page itself is not an API request
    assert status("/api/image/0001", client="10.0.0.2") == 200 and reached.count("/api/generate") == 2


# ---- the service on the demo's run -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(demo_run, ray_local):
    """The demo run served through Ray Serve on the suite's Ray, on a free port, 120 requests a minute per client
    (more than the tests before the rate test make, the page's images included)."""
    from jobs.config_io import load_config
    from jobs.run_config import RunConfig
    from jobs.serve import start_service, stop_service
    from pipeline.execution.session import RaySession
    from tests.ports import free_port

    assert demo_run.done.returncode == 0, demo_run.done.stderr[-3000:]
    run = load_config(RunConfig, os.path.join(demo_run.root, "config.yaml"),
                      [f"serve.port={free_port()}", "serve.requests_per_minute=120", "serve.max_replicas=1",
                       "serve.max_images=8"])
    url = start_service(run, RaySession(run.ray))
    yield url, run
    stop_service()


def post(url: str, path: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def data_url(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the demo run, if no test made it yet
def test_the_service_generates_varies_interpolates_and_searches_the_demo_run(service, demo_run):
    url, run = service
    info = json.load(urllib.request.urlopen(url + "api/info"))
    assert info["image_size"] == 32 and info["index_rows"] > 1000 and info["sampling"]["prior_cond_scale"] == 3.0

    status, answer = post(url, "/api/generate", {"prompt": "a red circle on the left", "n": 3, "seed": 5})
    assert status == 200 and len(answer["images"]) == 3 and answer["sampling"]["decoder_cond_scale"] == 3.0
    generated = [pixels(u) for u in answer["images"]]
    assert all(p.shape == (32, 32, 3) for p in generated) and len({p.tobytes() for p in generated}) == 3

    # interpolation: its endpoints are what generate gives for each prompt alone with the same seed
    ends = [post(url, "/api/generate", {"prompt": p, "n": 1, "seed": 2})[1]["images"][0]
            for p in ("a red circle on the left", "a blue square on the right")]
    status, answer = post(url, "/api/interpolate", {"start": {"prompt": "a red circle on the left"},
                                                    "end": {"prompt": "a blue square on the right"},
                                                    "frames": 4, "seed": 2})
    assert status == 200 and len(answer["images"]) == 4
    assert np.array_equal(pixels(answer["images"][0]), pixels(ends[0]))
    assert np.array_equal(pixels(answer["images"][-1]), pixels(ends[1]))

    # search by text: the nearest training images mostly carry the prompt's colour
    status, answer = post(url, "/api/search", {"source": {"prompt": "a green triangle in the center"}, "k": 8})
    assert status == 200 and len(answer["hits"]) == 8
    hits = answer["hits"]
    assert sum("green" in hit["caption"] for hit in hits) >= 6, [h["caption"] for h in hits]
    # a training row's image, served from its shard, finds that row first; its variations come back
    key = hits[0]["key"]
    with urllib.request.urlopen(url + f"api/image/{key}") as response:
        assert response.headers["Content-Type"] in ("image/jpeg", "image/png", "image/webp")
        row_image = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    status, answer = post(url, "/api/search", {"source": {"key": key}, "k": 3})
    assert status == 200 and answer["hits"][0]["key"] == key and answer["hits"][0]["similarity"] > 0.98
    status, answer = post(url, "/api/vary", {"source": {"key": key}, "n": 2})
    assert status == 200 and len(answer["images"]) == 2
    status, answer = post(url, "/api/vary", {"source": {"image": data_url(row_image)}, "n": 2, "sampler": "dpmpp",
                                             "steps": 10})
    assert status == 200 and answer["sampling"]["sampler"] == "dpmpp" and len(answer["images"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_service_refuses_bad_requests_with_a_4xx_naming_the_reason(service):
    url, run = service
    not_an_image = "data:image/png;base64," + base64.b64encode(b"<svg onload=alert(1)>").decode()
    refusals = [
        ("/api/generate", {"prompt": "a red circle", "n": 9}, 400, "serve.max_images"),
        ("/api/generate", {"prompt": "a red circle", "steps": 101}, 400, "serve.max_steps"),
        ("/api/generate", {"prompt": "x" * 501}, 400, "serve.max_prompt_chars"),
        ("/api/generate", {"prompt": ""}, 422, "at least 1 character"),
        ("/api/generate", {"prompt": "a", "sampler": "euler"}, 422, "ddim"),
        ("/api/generate", {"prompt": "a", "upload": "/etc/passwd"}, 422, "Extra inputs"),
        ("/api/generate", {"prompt": "a", "negative_prompt": "b", "prior_cond_scale": 1}, 400, "prior_cond_scale"),
        ("/api/vary", {"source": {"image": "http://127.0.0.1/x.png"}}, 400, "not a data URL"),
        ("/api/vary", {"source": {"image": not_an_image}}, 400, "not a PNG/JPEG/WEBP image"),
        ("/api/generate", {"prompt": "a", "candidates": 9}, 400, "serve.max_candidates"),
        ("/api/vary", {"source": {"prompt": "a red circle"}}, 400, "not a prompt"),
        ("/api/vary", {"source": {"key": "999999999"}}, 404, "not a row of the index"),
        ("/api/search", {"source": {"key": "../../etc"}}, 422, "pattern"),
        ("/api/search", {"source": {"prompt": "a", "key": "1"}}, 422, "exactly one"),
        ("/api/search", {"source": {"prompt": "a"}, "k": 33}, 400, "serve.max_hits"),
    ]
    for path, body, code, reason in refusals:
        status, answer = post(url, path, body)
        assert status == code and reason in json.dumps(answer), (path, body, status, answer)
    status, answer = post(url, "/api/generate", b"{not json", raw=True)
    assert status == 422
    # a body declared over the limit is answered before it is sent (sending it would race the answer's close)
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    connection.putrequest("POST", "/api/vary")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(run.serve.max_body_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "serve.max_body_bytes" in json.loads(response.read())["detail"]
    connection.close()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "api/image/12ab")
    assert refused.value.code == 400


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_page_in_chromium_generates_and_shows_the_nearest_training_images(service, tmp_path):
    from tests.browser import Browser
    from tests.test_report import chromium

    url, _ = service
    browser = Browser(chromium(), str(tmp_path / "profile"))
    try:
        browser.open(url)
        assert browser.when("document.getElementById('run').textContent").startswith("run demo")
        browser.evaluate("document.getElementById('prompt').value = 'a yellow square on the left';"
                         "document.getElementById('generate').click(); true")
        status = "(t => /: done|failed/.test(t) && t)(document.getElementById('status').textContent)"
        assert browser.when(status).startswith("Generating: done"), browser.evaluate("document.body.innerText")
        # every image on the page decoded: 4 generated, 8 training images with their captions
        shown = browser.evaluate("Promise.all([...document.images].map(i => i.decode())).then(() => [...document"
                                 ".images].map(i => [i.closest('.grid').id, i.naturalWidth, i.alt]))")
        assert [s[0] for s in shown] == ["generated"] * 4 + ["nearest"] * 8 and all(s[1] == 32 for s in shown)
        assert sum("yellow" in s[2] for s in shown[4:]) >= 6, shown
        browser.screenshot(str(tmp_path / "page.png"))

        # click a training image, then "Search by it": it comes back first
        key = browser.evaluate("document.querySelectorAll('#nearest img')[2].click();"
                               "document.getElementById('search-by').click();"
                               "document.querySelectorAll('#nearest img')[2].getAttribute('src')")
        assert re.fullmatch(r"/api/image/\d+", key)
        # (each click sets its "...ing..." status at once, so a wait for done or failed is a wait for this one)
        assert browser.when(status).startswith("Searching: done"), browser.evaluate("document.body.innerText")
        assert browser.evaluate("document.querySelector('#nearest img').getAttribute('src')") == key
        # and a generated one varied: four new images in the generated column
        browser.evaluate("document.querySelector('#generated img').click(); document.getElementById('vary').click(); true")
        assert browser.when(status).startswith("Varying: done"), browser.evaluate("document.body.innerText")
        assert browser.evaluate("document.querySelectorAll('#generated img').length") == 4
        screenshot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB"))
        assert screenshot.shape[1] == 1280 and screenshot.std() > 10  # the page drawn, not blank
    finally:
        browser.close()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_client_over_its_rate_gets_429_with_when_to_come_back(service):
    url, run = service
    codes = []
    for _ in range(2 * run.serve.requests_per_minute):  # the earlier tests spent some; the bucket refills meanwhile
        request = urllib.request.Request(url + "api/generate", data=b'{"prompt": "a", "n": 99}',
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as refused:
            codes.append(refused.code)
            if refused.code == 429:
                assert int(refused.headers["Retry-After"]) >= 1
                assert "serve.requests_per_minute" in json.loads(refused.read())["detail"]
                break
    # refused for its size (400) while the minute's requests last, then for its rate
    assert codes[-1] == 429 and set(codes[:-1]) <= {400}, codes


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_dalle2_serve_as_installed_serves_until_stopped_and_leaves_no_service(demo_run, tmp_path):
    """The installed command on its own embedded Ray: it says where it serves, answers there, and SIGTERM (what `ray
    job stop` sends) ends it with its application deleted."""
    import signal
    import subprocess
    import sys

    from tests.ports import free_port

    port = free_port()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [os.path.join(os.path.dirname(sys.executable), "dalle2"), "serve", "--root", demo_run.root,
               "--port", str(port), "--set", "ray.num_cpus=2"]
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in server.stderr:  # its log says when it serves, and where
            lines.append(line)
            if "serving" in line and "Ctrl-C stops" in line:
                break
        assert f"at http://127.0.0.1:{port}/" in lines[-1], "".join(lines[-20:])
        info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=60))
        assert info["run"] == "demo" and info["index_rows"] > 1000
        server.send_signal(signal.SIGTERM)
        rest = server.stderr.read()
        assert server.wait(120) == 0, rest[-3000:]
    finally:
        server.kill()
    assert "Traceback" not in "".join(lines) + rest and "(raylet)" not in rest, rest[-3000:]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5)
