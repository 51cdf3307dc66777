"""Serve a run: its model and data index behind an HTTP API and one page, on Ray Serve, until stopped.

    dalle2 serve --root RUN [--host 127.0.0.1] [--port 8000] [--set serve.max_replicas=4 ...]

Locally it starts an embedded Ray; on a cluster (`ray job submit -- dalle2 serve --root s3://... --host 0.0.0.0`, or
RAY_ADDRESS set) its replicas go where `serve.resources` and `serve.num_gpus_per_replica` say. The API and its limits:
jobs/service/app.py and the run config's `serve` section.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Optional

log = logging.getLogger(__name__)

APP_NAME = "dalle2"


def start_service(run, session) -> str:
    """Deploy the run's service on the session's Ray (connected here); returns its URL once a replica answers."""
    from ray import serve

    from .service.app import service

    settings = run.serve
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's own start-up lines stay in Ray's logs
    session.connect(dict(settings.resources), "serve.resources")
    serve.start(http_options={"host": settings.host, "port": settings.port,
                              "request_timeout_s": settings.request_timeout_s},
                logging_config={"log_level": "WARNING"})
    serve.run(service(run.root, settings), name=APP_NAME, route_prefix="/", blocking=False,
              logging_config={"log_level": "WARNING"})  # returns once the replicas are up (the model loaded)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}/"


def stop_service(shutdown: bool = True) -> None:
    """Remove the service's replicas, and with `shutdown` Serve's own controller and proxies (a Ray about to stop
    takes them with it, and a cluster's Serve may hold other applications)."""
    from ray import serve

    serve.delete(APP_NAME)
    if shutdown:
        serve.shutdown()


def main(argv: Optional[list[str]] = None, stop: Optional[threading.Event] = None) -> int:
    """Serve until interrupted (or `stop` is set)."""
    from pipeline.execution.console import setup_logging
    from pipeline.execution.session import RaySession

    from .config_io import load_config
    from .run_config import CONFIG_NAME, RunConfig

    parser = argparse.ArgumentParser(prog="dalle2 serve", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the run to serve (local path or URL)")
    parser.add_argument("--host", help="the address to listen on (serve.host; 0.0.0.0 beyond this machine)")
    parser.add_argument("--port", type=int, help="serve.port")
    parser.add_argument("--set", action="append", default=[], metavar="serve.FIELD=VALUE", help="override a field")
    args = parser.parse_args(argv)
    overrides = list(args.set) + [f"serve.host={args.host}"] * bool(args.host) + [f"serve.port={args.port}"] * bool(args.port)
    from pipeline.run.storage import exists

    saved = f"{args.root.rstrip('/')}/{CONFIG_NAME}"
    run = load_config(RunConfig, saved if exists(saved) else None, [f"root={args.root}", *overrides])
    setup_logging()
    stop = stop or threading.Event()
    with RaySession(run.ray, frozenset(run.serve.resources)) as session:
        url = start_service(run, session)
        if threading.current_thread() is threading.main_thread():
            # `ray job stop` and kill send SIGTERM: stop cleanly (set after Ray's start, which installs its own)
            import signal

            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        log.info("serving %s at %s (the page; the API under /api): Ctrl-C stops", run.root, url)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop_service(shutdown=False)
    return 0


if __name__ == "__main__":
    main()
