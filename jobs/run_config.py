"""The one YAML config of a run: the run's root URL and one section per stage."""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional

from dalle2.configs import StrictModel
from pipeline.config import DownloadConfig, EmbedConfig, RayConfig, ReorderConfig

from .config_io import load_config
from .train_common import TrainClipConfig, TrainDecoderConfig, TrainPriorConfig


class RunConfig(StrictModel):
    """Everything a run needs; every field has a laptop default."""

    root: str = "runs/demo"  # a local path or an fsspec URL (s3://bucket/run, gs://...)
    ray: RayConfig = RayConfig()
    download: DownloadConfig = DownloadConfig()
    embed: EmbedConfig = EmbedConfig()
    reorder: ReorderConfig = ReorderConfig()
    train_clip: TrainClipConfig = TrainClipConfig()
    train_prior: TrainPriorConfig = TrainPriorConfig()
    train_decoder: TrainDecoderConfig = TrainDecoderConfig()


def stage_main(argv: Optional[list[str]], description: str, run: Callable[[RunConfig], dict]) -> dict:
    """The shared body of every stage's main(argv): parse, validate, log, run, print the summary."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="the run's YAML config (local or any fsspec URL)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    args = parser.parse_args(argv)
    config = load_config(RunConfig, args.config, args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    save_run_config(config)
    summary = run(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_shard"}, sort_keys=True))
    return summary



CONFIG_NAME = "config.yaml"


def save_run_config(config: RunConfig) -> None:
    """Keep the effective config in the run root, so `dalle2 sample|status --root` can rebuild the run."""
    import yaml

    from pipeline.storage import write_atomic

    write_atomic(f"{config.root.rstrip('/')}/{CONFIG_NAME}", yaml.safe_dump(config.model_dump(mode="json")).encode())


def load_run_config(root: str) -> RunConfig:
    """The config a run was last started with (defaults with this root if it has none)."""
    from pipeline.storage import exists

    path = f"{root.rstrip('/')}/{CONFIG_NAME}"
    config = load_config(RunConfig, path) if exists(path) else RunConfig()
    return config.model_copy(update={"root": root})
