"""The stages of a run, in order: the one registry `dalle2 <stage>`, `dalle2 run` and the demo read."""

from __future__ import annotations

import logging
from typing import Optional

from pipeline.execution.session import RaySession
from pipeline.run.ledger import StageStopped  # noqa: F401 - the stages' stop, raised here and by the stages themselves

from . import download, embed, filter, index, reorder, train_clip, train_decoder, train_prior
from .run_config import RunConfig
from .stage import Stage, run_stage

log = logging.getLogger(__name__)

_IN_ORDER = (download, train_clip, embed, reorder, filter, train_prior, train_decoder, index)  # the order a run goes through
STAGES: list[Stage] = [module.STAGE for module in _IN_ORDER]  # each stage module's one STAGE
MODULES: dict[str, str] = {module.STAGE.name: module.__name__ for module in _IN_ORDER}  # for `python -m` and the CLI


def stage_named(name: str) -> Stage:
    """The registered stage called `name` (a KeyError lists the names)."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r}: the stages are {[stage.name for stage in STAGES]}")


def run_all(run: RunConfig, session: RaySession, timings: Optional[dict] = None) -> dict[str, str]:
    """Run every wanted stage in order on the command's `session`, skipping complete ones; returns
    {stage: 'ran' | 'skipped' | 'not wanted'} and fills `timings` with each stage's seconds."""
    import time

    outcome = {}
    timings = {} if timings is None else timings
    for stage in STAGES:
        if not stage.wanted(run):
            outcome[stage.name] = "not wanted"
            continue
        if stage.complete(run):
            log.info("%s: complete, skipped", stage.name)
            outcome[stage.name] = "skipped"
            continue
        log.info("%s: running", stage.name)
        started = time.time()
        summary = run_stage(stage, run, session)
        timings[stage.name] = round(time.time() - started, 1)
        if summary.get("failed_shards"):
            raise StageStopped(f"{stage.name} left failed shards {sorted(summary['failed_shards'])}: re-run to retry them")
        if stage.name == "download" and summary.get("rows_in") and not summary.get("written"):
            # nothing to train on: say why here, not as an empty sample plan three stages later
            reasons = sorted(summary.get("failed_by_reason", {}).items(), key=lambda item: -item[1])[:3]
            raise StageStopped(f"download wrote none of its {summary['rows_in']} rows; the most common reasons: "
                               + "; ".join(f"{reason} ({count})" for reason, count in reasons))
        outcome[stage.name] = "ran"
    return outcome
