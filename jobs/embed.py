"""Embed every image and caption of the run's shards with CLIP (Ray Data actor pool).

    python -m jobs.embed --config run.yaml [--set section.field=value ...]
"""

from __future__ import annotations

from typing import Optional

from pipeline.run.config import EmbedConfig

from .run_config import RunConfig
from .stage import Stage, ledger_complete


def embed_config(run: RunConfig) -> EmbedConfig:
    """The embed section, pointing at the CLIP that train_clip produced when none is named."""
    from .checkpoints import latest_checkpoint

    trained = latest_checkpoint(run.root, "clip") if run.train_clip.enabled and not run.embed.clip.checkpoint else None
    if not trained:
        return run.embed
    return run.embed.model_copy(update={"clip": run.embed.clip.model_copy(update={"checkpoint": trained})})


def run(config: RunConfig, session) -> dict:
    """Embed every downloaded shard not embedded yet, with the run's CLIP."""
    from pipeline.stages.embed.stage import run_embed

    return run_embed(embed_config(config), config.root, session)


def complete(run: RunConfig) -> bool:
    """Every downloaded shard embedded, none failed, by the CLIP the run now names."""
    from pipeline.formats.queries import complete_shards
    from pipeline.run.layout import EMBED, RunLayout
    from pipeline.run.ledger import Ledger
    from pipeline.stages.embed.stage import fingerprint

    layout = RunLayout(run.root)
    ledger = Ledger(layout, EMBED)
    if ledger.fingerprint_changes(fingerprint(embed_config(run))):
        return False  # made with another CLIP (train-clip ran on): not complete; the stage says why and stops
    return ledger_complete(run, EMBED) and set(complete_shards(layout)) <= ledger.done()


STAGE = Stage("embed", "embed the shards' images and captions with CLIP", run, complete,
              wanted=lambda run: not run.reorder.source)


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the embed stage of the run described by --config."""
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
