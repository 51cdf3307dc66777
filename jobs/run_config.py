"""The one YAML config of a run: the run's root URL and one section per stage."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator, model_validator

from dalle2.configs import StrictModel
from pipeline.run.config import (DownloadConfig, EmbedConfig, FilterConfig, HoldoutConfig, IndexConfig, RayConfig,
                                 ReorderConfig)

from .config_io import load_config
from .service.config import ServeConfig
from .training.config import (EvalConfig, SamplingConfig, TrackingConfig, TrainClipConfig, TrainDecoderConfig,
                              TrainPriorConfig)


class DemoConfig(StrictModel):
    """The built-in data set of `dalle2 demo` and how its samples are judged."""

    images: int = Field(default=2000, ge=54)  # at least one of each colour x shape x position
    # captions left out of the data set (CLIP, prior and decoder never see them), prompted at the end to measure
    # compositional generalisation: each attribute is seen, only the combination is new
    withhold: list[str] = []
    # the palette's colours the set draws (None: all six); the compositional benchmark's grid takes five
    colors: Optional[list[str]] = None
    samples_per_prompt: int = Field(default=4, ge=1, le=64)
    prompts: int = Field(default=6, ge=1, le=64)  # a --url-list run: this many of its held-out captions are prompted
    # this fraction of rows gets another image's caption, as on the web; the report says how many the filter caught
    mismatched_captions: float = Field(default=0.0, ge=0, le=0.5)

    @field_validator("withhold")
    @classmethod
    def _built_in_captions(cls, captions: list[str]) -> list[str]:
        from jobs.shapes import spec_of

        for caption in captions:
            spec_of(caption)
        return captions

    @field_validator("colors")
    @classmethod
    def _palette_colours(cls, colors: Optional[list[str]]) -> Optional[list[str]]:
        from jobs.shapes import COLORS

        if colors is not None:
            unknown = [c for c in colors if c not in COLORS]
            if unknown or len(set(colors)) < 2 or len(set(colors)) < len(colors):
                raise ValueError(f"give two or more distinct colours of the palette, each once ({', '.join(COLORS)}); "
                                 f"got {colors}")
        return colors

    @model_validator(mode="after")
    def _withheld_in_palette(self) -> "DemoConfig":
        from jobs.shapes import all_specs, seen_prompts, spec_of

        if self.colors is not None:
            outside = [c for c in self.withhold if spec_of(c).color not in self.colors]
            if outside:
                raise ValueError(f"withhold: {outside} name colours outside demo.colors {self.colors}")
        if len(set(self.withhold)) >= len(all_specs(self.colors)):
            raise ValueError("withholding every combination (of demo.colors) leaves nothing to train on")
        # the built-in run samples and scores the demo's prompts its data set has: one at least
        if not seen_prompts(self.withhold, self.colors):
            raise ValueError(f"demo.colors {self.colors} and demo.withhold leave none of the demo's prompts to draw")
        return self


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
    tracking: TrackingConfig = TrackingConfig()
    sampling: SamplingConfig = SamplingConfig()  # guidance, candidates, sampler and steps: evaluation and sampling alike
    index: IndexConfig = IndexConfig()  # dalle2 index: search over the training rows' image embeddings
    serve: ServeConfig = ServeConfig()  # dalle2 serve: the run's model and index over HTTP, and its limits

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data):
        """train_decoder.cond_scale (before `sampling` existed) is sampling.decoder_cond_scale: a run saved with it,
        or a config that still says it, keeps its guidance."""
        decoder = data.get("train_decoder") if isinstance(data, dict) else None
        if isinstance(decoder, dict) and "cond_scale" in decoder:
            import logging

            data = {**data, "train_decoder": {k: v for k, v in decoder.items() if k != "cond_scale"}}
            sampling = dict(data.get("sampling") or {})
            if "decoder_cond_scale" in sampling:
                raise ValueError("train_decoder.cond_scale is sampling.decoder_cond_scale now: give it once")
            data["sampling"] = {**sampling, "decoder_cond_scale": decoder["cond_scale"]}
            logging.getLogger(__name__).warning(
                "train_decoder.cond_scale is now sampling.decoder_cond_scale (%s): the config says it the old way",
                decoder["cond_scale"])
        return data

    def custom_resources(self) -> set[str]:
        """The names of the custom Ray resources the stages of this run ask for."""
        sections = (self.download.resources, self.embed.resources, self.reorder.resources, self.filter.resources,
                    self.train_clip.resources_per_worker, self.train_prior.resources_per_worker,
                    self.train_decoder.resources_per_worker)
        return {name for section in sections for name in section}

    @model_validator(mode="after")
    def _mlflow_store_workers_reach(self) -> "RunConfig":
        if self.tracking.mlflow and not self.tracking.mlflow_tracking_uri and "://" in self.root:
            raise ValueError(f"tracking.mlflow_tracking_uri: the default file store lives under a local root, and root "
                             f"is {self.root}: name a tracking server (http://...) or a database")
        return self

    @field_validator("root")
    @classmethod
    def _root_every_worker_sees(cls, root: str) -> str:
        from pipeline.run.storage import absolute_root

        if root.startswith("memory://"):
            raise ValueError("memory:// lives inside one process and the stages run on Ray workers: use a local "
                             "path, s3://, gs:// or another shared filesystem")
        return absolute_root(root)


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
