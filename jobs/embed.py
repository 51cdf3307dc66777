"""Embed every image and caption of the run's shards with CLIP (Ray Data actor pool).

    python -m jobs.embed --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

from typing import Optional

from pipeline.run.config import EmbedConfig
from pipeline.stages.embed.stage import run_embed

from .run_config import RunConfig, stage_main


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the embed stage of the run described by --config."""
    return stage_main(argv, __doc__.splitlines()[0], lambda c: run_embed(embed_config(c), c.root, c.ray))


def embed_config(run: RunConfig) -> EmbedConfig:
    """The embed section, pointing at the CLIP that train_clip produced when none is named."""
    from .train_common import latest_checkpoint

    trained = latest_checkpoint(run.root, "clip") if run.train_clip.enabled and not run.embed.clip.checkpoint else None
    if not trained:
        return run.embed
    return run.embed.model_copy(update={"clip": run.embed.clip.model_copy(update={"checkpoint": trained})})


if __name__ == "__main__":
    main()
