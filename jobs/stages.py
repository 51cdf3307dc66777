"""The stages of a run, in order, and how to tell that one is complete (so `dalle2 run` can skip it)."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

from pipeline.run.ledger import StageStopped  # noqa: F401 - the stages' stop, raised here and by the stages themselves

from .run_config import RunConfig

log = logging.getLogger(__name__)


def _ledger_complete(stage: str) -> Callable[[RunConfig], bool]:
    def complete(run: RunConfig) -> bool:
        from pipeline.run.layout import RunLayout
        from pipeline.run.storage import exists, read_json

        summary = RunLayout(run.root).ledger_summary(stage)
        return exists(summary) and not read_json(summary).get("failed_shards")

    return complete


def _download_complete(run: RunConfig) -> bool:
    from pipeline.run.layout import RunLayout
    from pipeline.run.storage import exists, read_json

    layout = RunLayout(run.root)
    if not _ledger_complete("download")(run) or not exists(f"{layout.inputs}/_SUCCESS.json"):
        return False
    return read_json(layout.ledger_summary("download"))["shards"] == len(read_json(f"{layout.inputs}/_SUCCESS.json")["shards"])


def _embed_complete(run: RunConfig) -> bool:
    from pipeline.formats.queries import complete_shards
    from pipeline.run.layout import RunLayout
    from pipeline.run.ledger import Ledger

    from pipeline.stages.embed.stage import fingerprint

    from .embed import embed_config

    layout = RunLayout(run.root)
    ledger = Ledger(layout, "embed")
    if ledger.fingerprint_changes(fingerprint(embed_config(run))):
        return False  # made with another CLIP (train-clip ran on): not complete; the stage says why and stops
    return _ledger_complete("embed")(run) and set(complete_shards(layout)) <= ledger.done()


def _filter_complete(run: RunConfig) -> bool:
    from pipeline.formats.aligned import aligned_shards
    from pipeline.run.config import FilterConfig
    from pipeline.stages.filter.stage import STAGE, fingerprint
    from pipeline.run.layout import RunLayout
    from pipeline.run.ledger import Ledger

    layout = RunLayout(run.root)
    ledger = Ledger(layout, STAGE)
    if ledger.fingerprint_changes(fingerprint(run.filter), defaults=fingerprint(FilterConfig())):
        return False  # made under other settings: not complete; the stage says why and stops
    shards = aligned_shards(layout)
    return _ledger_complete(STAGE)(run) and bool(shards) and set(shards) <= ledger.done()


def _training_complete(section: str) -> Callable[[RunConfig], bool]:
    def complete(run: RunConfig) -> bool:
        from pipeline.run.storage import exists, read_json

        from .train_common import storage_path

        config = getattr(run, section)
        summary = f"{storage_path(run.root)}/{config.job_name}_summary.json"
        if not exists(summary):
            return False
        metrics = read_json(summary)
        return (config.max_steps is not None and metrics.get("step", 0) >= config.max_steps) or \
            metrics.get("epoch", -1) >= config.epochs - 1

    return complete


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI command
    module: str  # the job module with main(argv)
    complete: Callable[[RunConfig], bool]
    wanted: Callable[[RunConfig], bool] = lambda run: True


STAGES = [
    Stage("download", "jobs.download", _download_complete, lambda run: bool(run.download.url_list) or _download_complete(run)),
    Stage("train-clip", "jobs.train_clip", _training_complete("train_clip"), lambda run: run.train_clip.enabled),
    Stage("embed", "jobs.embed", _embed_complete, lambda run: not run.reorder.source),
    Stage("reorder", "jobs.reorder", _ledger_complete("reorder"), lambda run: bool(run.reorder.source)),
    Stage("filter", "jobs.filter", _filter_complete, lambda run: run.filter.enabled),
    Stage("train-prior", "jobs.train_prior", _training_complete("train_prior")),
    Stage("train-decoder", "jobs.train_decoder", _training_complete("train_decoder")),
]


def run_all(run: RunConfig, config_args: list[str], timings: dict | None = None) -> dict[str, str]:
    """Run every wanted stage in order, skipping complete ones; returns {stage: 'ran' | 'skipped' | 'not wanted'}
    and fills `timings` with each stage's seconds."""
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
        summary = importlib.import_module(stage.module).main(config_args)
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
