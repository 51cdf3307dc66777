"""A stage of a run: its name, how it runs from a validated RunConfig on the command's Ray session, when it is
complete and whether the run wants it. Each stage module (jobs.download, jobs.embed, ...) exports one `STAGE`;
`dalle2 <stage>`, `python -m jobs.<module>` and `dalle2 run` (jobs/stages.py) all run it through here."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from pipeline.execution.session import RaySession

from .config_io import ConfigError, load_config
from .run_config import RunConfig, save_run_config


def _always(run: RunConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage: `run(config, session)` returns its summary; `complete(config)` says a re-run would do nothing."""

    name: str  # the CLI command
    help: str  # its line in `dalle2 --help`
    run: Callable[[RunConfig, RaySession], dict]
    complete: Callable[[RunConfig], bool]
    wanted: Callable[[RunConfig], bool] = _always

    def main(self, argv: Optional[list[str]] = None) -> dict:
        """The stage as a command: parse --config / --set, validate, open the Ray session, run, print the summary."""
        config = parse_run_config(argv, self.help)
        with run_session(config) as session:
            return run_stage(self, config, session)


def parse_run_config(argv: Optional[list[str]], description: str) -> RunConfig:
    """The run's config from `--config run.yaml` and `--set section.field=value` overrides, validated."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="the run's YAML config (local or any fsspec URL)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    args = parser.parse_args(argv)
    return load_config(RunConfig, args.config, args.set)


@contextlib.contextmanager
def run_session(config: RunConfig) -> Iterator[RaySession]:
    """The command's one Ray session (an embedded local Ray has every pool of the run's stages), after logging is
    set up, the root checked and the effective config kept in it; the Ray it started is stopped at the end."""
    from pipeline.execution.console import setup_logging

    setup_logging()
    with RaySession(config.ray, frozenset(config.custom_resources())) as session:
        check_root_reachable(config, session)
        save_run_config(config)
        yield session


def run_stage(stage: Stage, config: RunConfig, session: RaySession) -> dict:
    """Run `stage` and print its summary (without the per-shard part) as one JSON line."""
    summary = stage.run(config, session)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_shard"}, sort_keys=True))
    return summary


def check_root_reachable(config: RunConfig, session: RaySession) -> None:
    """Refuse a local root on a Ray cluster of several nodes: each node would write its own disk."""
    import os

    from pipeline.run.storage import is_local

    if not is_local(config.root) or (config.ray.address or os.environ.get("RAY_ADDRESS")) in (None, "", "local"):
        return  # an embedded local Ray is one node
    session.connect()
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        raise ConfigError(f"root: {config.root} is a local path but the Ray cluster has {nodes} nodes, whose "
                          "shards and checkpoints would scatter over their own disks: use s3:// or gs://")


def ledger_complete(run: RunConfig, stage: str) -> bool:
    """Whether the stage's ledger summary is there with no failed shard."""
    from pipeline.run.layout import RunLayout
    from pipeline.run.storage import exists, read_json

    summary = RunLayout(run.root).ledger_summary(stage)
    return exists(summary) and not read_json(summary).get("failed_shards")


def training_complete(run: RunConfig, section: str) -> bool:
    """Whether the training job of `section` reached its max_steps or its last epoch (its summary says)."""
    from pipeline.run.layout import TrainLayout
    from pipeline.run.storage import exists, read_json

    job = getattr(run, section)
    summary = TrainLayout(run.root).summary(job.job_name)
    if not exists(summary):
        return False
    metrics = read_json(summary)
    return (job.max_steps is not None and metrics.get("step", 0) >= job.max_steps) or \
        metrics.get("epoch", -1) >= job.epochs - 1
