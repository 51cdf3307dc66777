"""Run a per-shard callable over shards: in a local loop, or as Ray tasks with retries.

The callable is the stage (img2dataset's Downloader.__call__ is the model): it takes a shard name
and returns that shard's ShardRecord. Whatever runs it, local loop or Ray task or retry, calls the
same object. Shards that still fail after their retries are returned with their error, not dropped.
On Ray, the tasks go through BoundedTasks (a bounded number in flight), which the embed stage's driver uses too.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Literal, Optional

from pipeline.execution.console import progress_bar
from pipeline.execution.session import RaySession, require_session
from pipeline.run.ledger import ShardRecord

log = logging.getLogger(__name__)

ShardFn = Callable[[str], ShardRecord]


def run_shards(
    fn: ShardFn,
    shards: list[str],
    *,
    session: RaySession,
    distributor: Literal["ray", "local"] = "ray",
    num_cpus: float = 1.0,
    retries: int = 2,
    desc: str = "shards",
    timeout: Optional[float] = None,
    resources: Optional[dict[str, float]] = None,
    env: Optional[dict[str, str]] = None,
) -> tuple[list[ShardRecord], dict[str, str]]:
    """Run `fn` on every shard; returns (records, {shard: error} of shards that failed every try).

    `env`: environment variables the shard tasks' worker processes start with (on Ray, workers of their own: a
    setting a library reads once per process, as OpenCV its pixel limit, is never one another run left behind).

    On Ray, a shard not done `timeout` seconds after it was submitted (queueing and retries included) is
    cancelled (its worker killed) and failed with that reason; a re-run tries it again."""
    require_session(session, f"{desc}: run_shards")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not shards:
        return [], {}
    if distributor == "local":
        return _run_local(fn, shards, retries, desc)
    return _run_ray(session, fn, shards, num_cpus, retries, desc, timeout, resources or {}, env or {})


def _run_local(fn: ShardFn, shards: list[str], retries: int, desc: str) -> tuple[list[ShardRecord], dict[str, str]]:
    records, failures = [], {}
    for shard in progress_bar(iterable=shards, desc=desc, unit="shard"):
        for attempt in range(retries + 1):
            try:
                records.append(fn(shard))
                failures.pop(shard, None)
                break
            except Exception as error:  # noqa: BLE001 - a shard's failure must not stop the others
                failures[shard] = f"{type(error).__name__}: {error}"
                log.warning("shard %s failed (try %d of %d): %s", shard, attempt + 1, retries + 1, failures[shard])
                log.debug(traceback.format_exc())
    return records, failures


def _run_ray(session: RaySession, fn: ShardFn, shards: list[str], num_cpus: float, retries: int, desc: str, timeout: Optional[float],
             resources: dict[str, float], env: dict[str, str]):
    import ray

    session.connect(resources, f"{desc}: resources")
    # a task on a node that dies is retried on another (max_retries), like one that raised
    placed = {"runtime_env": {"env_vars": env}} if env else {}  # merged with the job's own runtime env
    remote = ray.remote(_call).options(num_cpus=num_cpus, max_retries=retries, retry_exceptions=True,
                                       resources=resources, **placed)
    fn_ref = ray.put(fn)
    # Twice as many tasks in flight as the cluster can run now (re-read as it grows, so an autoscaler sees
    # demand), and never all shards at once: the driver's bookkeeping stays bounded.
    def slots() -> int:
        return max(4, 2 * int(ray.cluster_resources().get("CPU", 1) / max(num_cpus, 1e-3)))

    tasks, limit_read = BoundedTasks(remote, slots()), time.monotonic()
    for shard in shards:
        tasks.submit(shard, fn_ref, shard)
    records, failures = [], {}
    with progress_bar(total=len(shards), desc=desc, unit="shard") as progress:
        while tasks:
            if time.monotonic() - limit_read > 10:
                tasks.limit, limit_read = slots(), time.monotonic()
            for done in tasks.wait(timeout=1.0 if timeout else None):
                if done.error is None:
                    records.append(done.result)
                else:  # collected and reported, not raised
                    failures[done.key] = done.error
                    log.error("shard %s failed after %d tries: %s", done.key, retries + 1, done.error)
                progress.update(1)
            if timeout:
                for shard in tasks.cancel_overdue(timeout):
                    failures[shard] = f"deadline exceeded: shard took longer than {timeout:g} s"
                    log.error("shard %s cancelled: %s", shard, failures[shard])
                    progress.update(1)
    return records, failures


@dataclass
class Finished:
    """A call of BoundedTasks that ended: its key, and what it returned or `error` ("Type: message" of what it
    raised, the cause of a Ray task error)."""

    key: Hashable
    result: Any = None
    error: Optional[str] = None


class BoundedTasks:
    """Calls of one Ray remote function (`remote.remote(*args)`), at most `limit` in flight: the others wait, in
    the order they were submitted, and start as calls end (in `submit` and `wait`). Each call has a key, a
    shard's name, that its outcome is reported under. `limit` may be changed between calls; `on_start(key)` runs
    after each call is started."""

    def __init__(self, remote, limit: int, on_start: Optional[Callable[[Hashable], None]] = None):
        self.remote, self.limit, self.on_start = remote, limit, on_start
        self.queued: deque = deque()  # (key, args, kwargs)
        self.in_flight: dict = {}  # ref -> (key, started at: time.monotonic())

    def __len__(self) -> int:
        """Calls not ended: in flight or waiting."""
        return len(self.queued) + len(self.in_flight)

    def submit(self, key: Hashable, *args, **kwargs) -> None:
        self.queued.append((key, args, kwargs))
        self._start()

    def _start(self) -> None:
        while self.queued and len(self.in_flight) < self.limit:
            key, args, kwargs = self.queued.popleft()
            self.in_flight[self.remote.remote(*args, **kwargs)] = (key, time.monotonic())
            if self.on_start is not None:
                self.on_start(key)

    def wait(self, timeout: Optional[float] = None, every: bool = False) -> list[Finished]:
        """The calls that ended: one, waiting up to `timeout` seconds (None: until one ends), or with `every`, all
        those ended by then (timeout=0: those ended now). Waiting calls start in the slots that frees."""
        import ray

        self._start()
        if not self.in_flight:
            return []
        refs = list(self.in_flight)
        done, _ = ray.wait(refs, num_returns=len(refs) if every else 1, timeout=timeout)
        finished = []
        for ref in done:
            key, _ = self.in_flight.pop(ref)
            try:
                finished.append(Finished(key, ray.get(ref)))
            except Exception as error:  # noqa: BLE001 - reported with its key, not raised
                cause = getattr(error, "cause", None) or error
                finished.append(Finished(key, error=f"{type(cause).__name__}: {cause}"))
        self._start()
        return finished

    def cancel_overdue(self, seconds: float) -> list[Hashable]:
        """Cancel the calls in flight for more than `seconds` since they started (their workers killed); their keys."""
        import ray

        now, cancelled = time.monotonic(), []
        for ref, (key, started) in list(self.in_flight.items()):
            if now - started > seconds:
                ray.cancel(ref, force=True)
                del self.in_flight[ref]
                cancelled.append(key)
        return cancelled


def _call(fn: ShardFn, shard: str) -> ShardRecord:
    return fn(shard)
