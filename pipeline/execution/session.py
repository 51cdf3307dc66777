"""The Ray a command runs on: one `RaySession` per command, opened by the CLI (or a test) and passed to every stage.

It connects on first use, to the configured cluster (or RAY_ADDRESS), or by starting an embedded local Ray with
every custom resource the run's stages ask for; it remembers which, so a missing pool is an error on a local Ray and
a warning on a cluster (whose autoscaler adds the node type), and `close()` stops only a Ray it started. A stage
called without one is refused: nothing starts a default Ray behind the caller's back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

from pipeline.execution.console import VERBOSE_ENV, verbose
from pipeline.run.config import RayConfig

log = logging.getLogger(__name__)

LOCAL_POOL = 1000.0  # units of each custom resource an embedded local Ray has
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train reads it in the driver and passes it on


@dataclass
class RaySession:
    """One command's Ray: `config` says where, `pools` which custom resources an embedded local Ray starts with."""

    config: RayConfig = field(default_factory=RayConfig)
    pools: frozenset[str] = frozenset()  # every stage's of the run, so `dalle2 run` uses one local Ray for all
    embedded: bool = False  # set once this session started its own local Ray (not a cluster it joined)

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self, resources: Optional[dict[str, float]] = None, field: str = "") -> None:
        """Join the configured cluster (or RAY_ADDRESS), or start an embedded local Ray, unless Ray is up already;
        then check that the cluster has the custom `resources` the config `field` asks for."""
        import ray

        if ray.is_initialized():
            self.require_resources(resources or {}, field)
            return
        address = self.config.address or os.environ.get("RAY_ADDRESS")
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
            # one machine is every node type at once: it has each pool a stage asks for, in plenty. "local": always
            # a new one, even with a `ray start` cluster up or its address file left behind (ray.init() would join
            # those, and then refuse the CPUs and pools asked for here)
            ray.init(address="local", num_cpus=self.config.local_cpus(), include_dashboard=False,
                     log_to_driver=verbose(), resources={name: LOCAL_POOL for name in self.pools | set(resources or {})})
            self.embedded = True
        if not verbose():
            log.info("Ray workers log to Ray's session folder (/tmp/ray/session_latest/logs on each node); "
                     "%s=1 or `dalle2 --verbose` shows them here", VERBOSE_ENV)
        self.require_resources(resources or {}, field)

    def require_resources(self, resources: dict[str, float], field: str) -> None:
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
        if self.embedded:
            raise ValueError(f"{message}: this process's local Ray was started without them; set {field}: {{}} here")
        log.warning("%s now: its work waits until a node that has them joins (cluster.yaml's node types declare "
                    "cpu_pool and gpu_pool; the autoscaler starts them on demand)", message)

    @contextlib.contextmanager
    def preemption_watcher_off(self) -> Iterator[None]:
        """Around a fit: Ray Train's preemption watcher (one actor per fit that polls Ray for drained nodes, ~2 s of
        CPU to start) is left out on a local Ray this session started, where nothing drains a node; kept on a
        cluster, and whatever the user set wins."""
        if not self.embedded or PREEMPTION_WATCHER in os.environ:
            yield
            return
        os.environ[PREEMPTION_WATCHER] = "0"
        try:
            yield
        finally:
            os.environ.pop(PREEMPTION_WATCHER, None)

    def close(self) -> None:
        """Stop the local Ray this session started, if it did (a cluster is left as it is): called when a command
        ends, it skips the half second Ray's exit hook sleeps for late log lines."""
        import ray

        if self.embedded and ray.is_initialized():
            ray.shutdown()
        self.embedded = False


def require_session(session: object, caller: str) -> RaySession:
    """`session` itself, or a TypeError naming `caller`: a stage never starts a default Ray on its own."""
    if not isinstance(session, RaySession):
        raise TypeError(f"{caller} needs the command's RaySession (pipeline.execution.session), got {session!r}: "
                        "open one per command, `with RaySession(config.ray, pools) as session:`, and pass it on")
    return session
