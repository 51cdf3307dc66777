"""The one YAML config of a run: the run's root URL and one section per stage."""

from __future__ import annotations

import json
from typing import Callable, Optional

from pydantic import Field, field_validator

from dalle2.configs import StrictModel
from pipeline.run.config import DownloadConfig, EmbedConfig, FilterConfig, HoldoutConfig, RayConfig, ReorderConfig

from .config_io import ConfigError, load_config
from .evaluation import EvalConfig
from .train_common import TrainClipConfig, TrainDecoderConfig, TrainPriorConfig


class DemoConfig(StrictModel):
    """The built-in data set of `dalle2 demo` and how its samples are judged."""

    images: int = Field(default=2000, ge=54)  # at least one of each colour x shape x position
    # captions left out of the data set (CLIP, prior and decoder never see them), prompted at the end to measure
    # compositional generalisation: each attribute is seen, only the combination is new
    withhold: list[str] = []
    samples_per_prompt: int = Field(default=4, ge=1, le=64)
    prompts: int = Field(default=6, ge=1, le=64)  # a --url-list run: this many of its held-out captions are prompted
    # this fraction of rows gets another image's caption, as on the web; the report says how many the filter caught
    mismatched_captions: float = Field(default=0.0, ge=0, le=0.5)

    @field_validator("withhold")
    @classmethod
    def _built_in_captions(cls, captions: list[str]) -> list[str]:
        from jobs.shapes import all_specs, spec_of

        for caption in captions:
            spec_of(caption)
        if len(set(captions)) >= len(all_specs()):
            raise ValueError("withholding every combination leaves nothing to train on")
        return captions


class RunConfig(StrictModel):
    """Everything a run needs; every field has a laptop default."""

    # a local path (made absolute, the default too) or an fsspec URL (s3://bucket/run, gs://...)
    root: str = Field(default="runs/demo", validate_default=True)
    ray: RayConfig = RayConfig()
    download: DownloadConfig = DownloadConfig()
    holdout: HoldoutConfig = HoldoutConfig()  # rows no training stage reads, drawn before the first one
    embed: EmbedConfig = EmbedConfig()
    reorder: ReorderConfig = ReorderConfig()
    filter: FilterConfig = FilterConfig()
    train_clip: TrainClipConfig = TrainClipConfig()
    train_prior: TrainPriorConfig = TrainPriorConfig()
    train_decoder: TrainDecoderConfig = TrainDecoderConfig()
    demo: DemoConfig = DemoConfig()
    eval: EvalConfig = EvalConfig()

    def custom_resources(self) -> set[str]:
        """The names of the custom Ray resources the stages of this run ask for."""
        sections = (self.download.resources, self.embed.resources, self.reorder.resources, self.filter.resources,
                    self.train_clip.resources_per_worker, self.train_prior.resources_per_worker,
                    self.train_decoder.resources_per_worker)
        return {name for section in sections for name in section}

    @field_validator("root")
    @classmethod
    def _root_every_worker_sees(cls, root: str) -> str:
        from pipeline.run.storage import absolute_root

        if root.startswith("memory://"):
            raise ValueError("memory:// lives inside one process and the stages run on Ray workers: use a local "
                             "path, s3://, gs:// or another shared filesystem")
        return absolute_root(root)


def stage_main(argv: Optional[list[str]], description: str, run: Callable[[RunConfig], dict]) -> dict:
    """The shared body of every stage's main(argv): parse, validate, log, run, print the summary."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="the run's YAML config (local or any fsspec URL)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    args = parser.parse_args(argv)
    config = load_config(RunConfig, args.config, args.set)
    from pipeline.execution.console import setup_logging

    setup_logging()
    from pipeline.execution.distributor import declare_pools

    declare_pools(config.custom_resources())
    check_root_reachable(config)
    save_run_config(config)
    summary = run(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_shard"}, sort_keys=True))
    return summary



def check_root_reachable(config: RunConfig) -> None:
    """Refuse a local root on a Ray cluster of several nodes: each node would write its own disk."""
    import os

    from pipeline.run.storage import is_local

    if not is_local(config.root) or (config.ray.address or os.environ.get("RAY_ADDRESS")) in (None, "", "local"):
        return  # an embedded local Ray is one node
    from pipeline.execution.distributor import ensure_ray

    ensure_ray(config.ray)
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        raise ConfigError(f"root: {config.root} is a local path but the Ray cluster has {nodes} nodes, whose "
                          "shards and checkpoints would scatter over their own disks: use s3:// or gs://")


CONFIG_NAME = "config.yaml"


def save_run_config(config: RunConfig) -> None:
    """Keep the effective config in the run root, so `dalle2 sample|status --root` can rebuild the run."""
    import yaml

    from pipeline.run.storage import write_atomic

    write_atomic(f"{config.root.rstrip('/')}/{CONFIG_NAME}", yaml.safe_dump(config.model_dump(mode="json")).encode())


def load_run_config(root: str) -> RunConfig:
    """The config a run was last started with (defaults with this root if it has none)."""
    from pipeline.run.storage import exists

    path = f"{root.rstrip('/')}/{CONFIG_NAME}"
    config = load_config(RunConfig, path) if exists(path) else RunConfig()
    return RunConfig.model_validate({**config.model_dump(mode="json"), "root": root})
