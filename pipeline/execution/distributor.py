"""Run a per-shard callable over shards: in a local loop, or as Ray tasks with retries.

The callable is the stage (img2dataset's Downloader.__call__ is the model): it takes a shard name
and returns that shard's ShardRecord. Whatever runs it, local loop or Ray task or retry, calls the
same object. Shards that still fail after their retries are returned with their error, not dropped.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from typing import Callable, Iterator, Literal, Optional

from pipeline.run.config import RayConfig
from pipeline.execution.console import progress_bar
from pipeline.run.ledger import ShardRecord

log = logging.getLogger(__name__)

ShardFn = Callable[[str], ShardRecord]


_EMBEDDED: list[bool] = []  # set once this process started its own local Ray
_LOCAL_POOLS: set[str] = set()  # custom resources an embedded local Ray is started with (every stage's of the run)


def declare_pools(names: set[str]) -> None:
    """The custom resources any stage of this run asks for: an embedded local Ray has them all, so `dalle2 run`
    can run a CPU-pool stage and then a GPU-pool one in the one local Ray it started."""
    _LOCAL_POOLS.update(names)


def ensure_ray(config: Optional[RayConfig] = None, resources: Optional[dict[str, float]] = None, field: str = "") -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), or start an embedded local Ray; then check that the
    cluster has the custom `resources` the config `field` asks for."""
    import os

    import ray

    from pipeline.execution.console import VERBOSE_ENV, verbose

    if ray.is_initialized():
        require_resources(resources or {}, field)
        return
    config = config or RayConfig()
    address = config.address or os.environ.get("RAY_ADDRESS")
    # Ray's workers (their logging, Train's controllers and cleaners) print to their log files in Ray's session
    # folder; the stages show their own progress bars. With DALLE2_VERBOSE=1 all of it comes here too.
    if address == "local":
        address = None  # Ray's word for a new local instance: the embedded one below, with its CPUs and pools
    if address:  # a cluster's address, or "auto": the local Ray a `ray start --head` on this machine keeps up
        ray.init(address=address, log_to_driver=verbose())
        # which cluster: "auto" with no `ray start` address file joins any Ray it finds running on this machine
        log.info("Ray: joined the cluster at %s (address: %s; nodes: %d, CPUs: %d)",
                 ray.get_runtime_context().gcs_address, address, sum(node["Alive"] for node in ray.nodes()),
                 ray.cluster_resources().get("CPU", 0))
    else:
        # one machine is every node type at once: it has each pool a stage asks for, in plenty. "local": always a
        # new one, even with a `ray start` cluster up or its address file left behind (ray.init() would join
        # those, and then refuse the CPUs and pools asked for here)
        ray.init(address="local", num_cpus=config.local_cpus(), include_dashboard=False, log_to_driver=verbose(),
                 resources={name: LOCAL_POOL for name in _LOCAL_POOLS | set(resources or {})})
        _EMBEDDED.append(True)
    if not verbose():
        log.info("Ray workers log to Ray's session folder (/tmp/ray/session_latest/logs on each node); "
                 "%s=1 or `dalle2 --verbose` shows them here", VERBOSE_ENV)
    require_resources(resources or {}, field)


LOCAL_POOL = 1000.0  # units of each custom resource an embedded local Ray has


def ray_is_embedded() -> bool:
    """Whether the Ray this process uses is the local one it started (not a cluster it joined)."""
    return bool(_EMBEDDED)


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train reads it in the driver and passes it on


@contextlib.contextmanager
def preemption_watcher_off_when_embedded() -> Iterator[None]:
    """Around a fit: Ray Train's preemption watcher (one actor per fit that polls Ray for drained nodes, ~2 s of
    CPU to start) is left out on a local Ray this process started, where nothing drains a node; kept on a cluster,
    and whatever the user set wins."""
    import os

    if not ray_is_embedded() or PREEMPTION_WATCHER in os.environ:
        yield
        return
    os.environ[PREEMPTION_WATCHER] = "0"
    try:
        yield
    finally:
        os.environ.pop(PREEMPTION_WATCHER, None)


def stop_embedded_ray() -> None:
    """Stop the local Ray this process started, if it did (a cluster is left as it is): called when a command ends,
    it skips the half second Ray's exit hook sleeps for late log lines."""
    import ray

    if _EMBEDDED and ray.is_initialized():
        ray.shutdown()
    _EMBEDDED.clear()


def require_resources(resources: dict[str, float], field: str) -> None:
    """Refuse custom resources no node has when nothing can add one (an embedded Ray); on a cluster, warn: its
    autoscaler adds the node types that declare them when tasks ask."""
    import ray

    if not resources:
        return
    have = ray.cluster_resources()
    missing = {name: amount for name, amount in resources.items() if have.get(name, 0) < amount}
    if not missing:
        return
    message = f"{field} asks for {missing}, which no node of the Ray cluster has"
    if _EMBEDDED:
        raise ValueError(f"{message}: this process's local Ray was started without them; set {field}: {{}} here")
    log.warning("%s now: its work waits until a node that has them joins (cluster.yaml's node types declare "
                "cpu_pool and gpu_pool; the autoscaler starts them on demand)", message)


def run_shards(
    fn: ShardFn,
    shards: list[str],
    *,
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
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not shards:
        return [], {}
    if distributor == "local":
        return _run_local(fn, shards, retries, desc)
    return _run_ray(fn, shards, num_cpus, retries, desc, timeout, resources or {}, env or {})


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


def _run_ray(fn: ShardFn, shards: list[str], num_cpus: float, retries: int, desc: str, timeout: Optional[float],
             resources: dict[str, float], env: dict[str, str]):
    import time

    import ray

    ensure_ray(resources=resources, field=f"{desc}: resources")
    # a task on a node that dies is retried on another (max_retries), like one that raised
    placed = {"runtime_env": {"env_vars": env}} if env else {}  # merged with the job's own runtime env
    remote = ray.remote(_call).options(num_cpus=num_cpus, max_retries=retries, retry_exceptions=True,
                                       resources=resources, **placed)
    fn_ref = ray.put(fn)
    # Twice as many tasks in flight as the cluster can run now (re-read as it grows, so an autoscaler sees
    # demand), and never all shards at once: the driver's bookkeeping stays bounded.
    def slots() -> int:
        return max(4, 2 * int(ray.cluster_resources().get("CPU", 1) / max(num_cpus, 1e-3)))

    limit, limit_read = slots(), time.monotonic()
    queue = list(reversed(shards))
    pending: dict = {}  # ref -> (shard, submitted at)
    records, failures = [], {}
    with progress_bar(total=len(shards), desc=desc, unit="shard") as progress:
        while queue or pending:
            if time.monotonic() - limit_read > 10:
                limit, limit_read = slots(), time.monotonic()
            while queue and len(pending) < limit:
                shard = queue.pop()
                pending[remote.remote(fn_ref, shard)] = (shard, time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0 if timeout else None)
            for ref in done:
                shard, _ = pending.pop(ref)
                try:
                    records.append(ray.get(ref))
                except Exception as error:  # noqa: BLE001 - collected and reported, not raised
                    cause = getattr(error, "cause", None) or error
                    failures[shard] = f"{type(cause).__name__}: {cause}"
                    log.error("shard %s failed after %d tries: %s", shard, retries + 1, failures[shard])
                progress.update(1)
            if timeout:
                now = time.monotonic()
                for ref, (shard, submitted) in list(pending.items()):
                    if now - submitted > timeout:
                        ray.cancel(ref, force=True)
                        pending.pop(ref)
                        failures[shard] = f"deadline exceeded: shard took longer than {timeout:g} s"
                        log.error("shard %s cancelled: %s", shard, failures[shard])
                        progress.update(1)
    return records, failures


def _call(fn: ShardFn, shard: str) -> ShardRecord:
    return fn(shard)
