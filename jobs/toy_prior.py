"""Train the diffusion prior on generated embeddings and report LAION's prior metrics.

A quick end-to-end check of the model code with no data: text embeds are random unit vectors and
each image embed is a fixed random linear map of its text embed. Run:
    python -m jobs.toy_prior [--config toy.yaml] [--set steps=500]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Optional, Union

import torch
from pydantic import Field
from tqdm.auto import tqdm

from dalle2.configs import PriorConfig, StrictModel, resolve
from dalle2.trainer_config import TrainerConfig
from dalle2.layers import l2norm
from dalle2.metrics import prior_metrics
from dalle2.prior import DiffusionPrior
from dalle2.trainer import PriorTrainer
from jobs.config_io import load_config

log = logging.getLogger("jobs.toy_prior")


class ToyPriorJob(StrictModel):
    """Settings of the toy prior run."""

    prior: Union[str, dict] = "tiny"  # a registered architecture name, or a dict (may say `base: tiny`)
    trainer: TrainerConfig = TrainerConfig(lr=1e-3, warmup_steps=50)
    steps: int = 400
    batch_size: int = 128
    eval_every: int = 100
    eval_size: int = 256
    seed: int = 0
    checkpoint: Optional[str] = None  # an fsspec folder to save the trained prior to
    threads: int = Field(default=0, description="torch threads; 0 leaves torch's default")


def main(argv: Optional[list[str]] = None) -> dict:
    """Train, evaluate, optionally save; returns the final metrics."""
    parser = argparse.ArgumentParser(description="Train the prior on generated embeddings")
    parser.add_argument("--config", help="YAML file with ToyPriorJob fields")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field")
    args = parser.parse_args(argv)
    job = load_config(ToyPriorJob, args.config, args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)

    prior = DiffusionPrior(config=resolve(PriorConfig, job.prior, "prior"))
    dim = prior.image_embed_dim
    mapping = torch.randn(dim, dim)

    def pairs(n: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        text_embed = l2norm(torch.randn(n, dim, generator=generator))
        return text_embed, l2norm(text_embed @ mapping.T)

    trainer = PriorTrainer(prior, job.trainer)
    eval_text, eval_image = pairs(job.eval_size, torch.Generator().manual_seed(job.seed + 1))
    start, metrics = time.perf_counter(), {}
    progress = tqdm(range(1, job.steps + 1), desc="prior", unit="step")
    for step in progress:
        text_embed, image_embed = pairs(job.batch_size)
        loss = trainer.train_step({"text_embed": text_embed, "image_embed": image_embed})
        progress.set_postfix(loss=f"{loss:.4f}")
        if step % job.eval_every == 0 or step == job.steps:
            metrics = {"step": step, "loss": loss, **prior_metrics(trainer.sample, eval_text, eval_image)}
            log.info("step %d %s", step, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    metrics["samples_per_s"] = job.steps * job.batch_size / (time.perf_counter() - start)
    if job.checkpoint:
        trainer.save(job.checkpoint)
    log.info("final %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return metrics


if __name__ == "__main__":
    main()
