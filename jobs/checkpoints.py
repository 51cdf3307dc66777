"""Loading what a run trained: its CLIP, and DALLE2 from the latest prior and decoder checkpoints."""

from __future__ import annotations

import logging
from typing import Optional

from .run_config import RunConfig
from .train_common import latest_checkpoint

log = logging.getLogger(__name__)


def run_clip(run: RunConfig):
    """The run's CLIP: the one train_clip produced, else embed.clip (a checkpoint, or an open_clip name)."""
    from dalle2.clip import load_clip

    trained = latest_checkpoint(run.root, "clip")
    if trained:
        return load_clip(checkpoint=trained)
    source = run.embed.clip
    return load_clip(source.model_name, source.pretrained, source.checkpoint)


def load_dalle2(run: RunConfig, use_ema: bool = True, prior_checkpoint: Optional[str] = None,
                decoder_checkpoint: Optional[str] = None):
    """DALLE2 from the run's latest prior and decoder checkpoints (EMA weights by default)."""
    from dalle2.checkpoint import load_checkpoint, load_state
    from dalle2.configs import DecoderConfig, PriorConfig
    from dalle2.decoder import Decoder
    from dalle2.prior import DiffusionPrior
    from dalle2.text_to_image import DALLE2

    prior_checkpoint = prior_checkpoint or latest_checkpoint(run.root, "prior")
    decoder_checkpoint = decoder_checkpoint or latest_checkpoint(run.root, "decoder")
    if not prior_checkpoint or not decoder_checkpoint:
        raise FileNotFoundError(f"{run.root} has no prior and decoder checkpoints yet: run train-prior and train-decoder")
    clip = run_clip(run)
    prior = DiffusionPrior(clip=clip, config=PriorConfig(**load_state(prior_checkpoint)["config"]))
    load_checkpoint(prior_checkpoint, prior, prior.config.model_dump(mode="json"), use_ema=use_ema)
    decoder = Decoder(config=DecoderConfig(**load_state(decoder_checkpoint)["config"]))
    load_checkpoint(decoder_checkpoint, decoder, decoder.config.model_dump(mode="json"), use_ema=use_ema)
    log.info("loaded DALLE2 from %s and %s", prior_checkpoint, decoder_checkpoint)
    return DALLE2(prior.eval(), decoder.eval())
