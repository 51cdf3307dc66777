"""The service under a bounded load on 127.0.0.1: requests per second and latency (p50, p95) of generate and search
at 1, 2 and 4 clients in flight, beside the same work called in-process (RunModel / RunSearch, no HTTP, no Serve)
as the baseline, in one run.

    make demo && python bench/service.py --root runs/demo [--requests 24] [--clients 1 2 4] [--replicas 1]

Each client sends its requests one after another (a closed loop), so at most `clients` are in flight; every answer
must be 200 and hold its images or hits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

BODIES = {
    "generate n=1": ("/api/generate", {"prompt": "a red circle on the left", "n": 1}),
    "generate n=4": ("/api/generate", {"prompt": "a blue square on the right", "n": 4}),
    "search k=8": ("/api/search", {"source": {"prompt": "a green triangle in the center"}, "k": 8}),
}


def post(url: str, path: str, body: dict) -> float:
    """One request's latency in seconds (an answer other than 200 with results stops the bench)."""
    started = time.perf_counter()
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    assert response.status == 200 and (answer.get("images") or answer.get("hits")), answer
    return time.perf_counter() - started


def load(url: str, path: str, body: dict, requests: int, clients: int) -> dict:
    """`requests` requests from `clients` closed-loop clients: requests per second and latency percentiles."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        seeded = path != "/api/search"  # each generation its own seed; a search has none
        latencies = sorted(pool.map(lambda i: post(url, path, {**body, **({"seed": i} if seeded else {})}),
                                    range(requests)))
    wall = time.perf_counter() - started
    return {"rps": requests / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def baseline(root: str, requests: int) -> dict:
    """The same work in this process, one call after another: seconds per call."""
    from jobs.generation import RunModel
    from jobs.search import RunSearch

    model = RunModel(root)
    search = RunSearch(root, clip=model.model.clip)
    work = {"generate n=1": lambda i: model.text_to_image(["a red circle on the left"], 1, seed=i),
            "generate n=4": lambda i: model.text_to_image(["a blue square on the right"], 4, seed=i),
            "search k=8": lambda i: search.by_text(["a green triangle in the center"], 8)}
    out = {}
    for name, fn in work.items():
        fn(0)  # warm
        started = time.perf_counter()
        for i in range(requests):
            fn(i)
        out[name] = (time.perf_counter() - started) / requests
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/demo")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()

    import torch

    from jobs.config_io import load_config
    from jobs.run_config import RunConfig
    from jobs.serve import start_service, stop_service
    from pipeline.execution.session import RaySession

    torch.set_num_threads(1)  # as a replica's process runs (one CPU each)
    direct = baseline(args.root, max(4, args.requests // 4))
    run = load_config(RunConfig, f"{args.root.rstrip('/')}/config.yaml",
                      [f"serve.min_replicas={args.replicas}", f"serve.max_replicas={args.replicas}",
                       "serve.requests_per_minute=100000", "serve.port=8765"])
    with RaySession(run.ray) as session:
        url = start_service(run, session)
        for name, (path, body) in BODIES.items():
            post(url, path, body)  # warm
        rows = []
        for name, (path, body) in BODIES.items():
            for clients in args.clients:
                figures = load(url, path, body, args.requests, clients)
                rows.append((name, clients, figures))
        stop_service()
    print(f"{'request':<14} {'clients':>7} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'in-process s':>13}")
    for name, clients, f in rows:
        print(f"{name:<14} {clients:>7} {f['rps']:>7.2f} {f['p50']:>7.3f} {f['p95']:>7.3f} {direct[name]:>13.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
