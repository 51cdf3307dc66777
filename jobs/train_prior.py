"""Train the diffusion prior on Ray Train from the run's aligned embeddings.

    python -m jobs.train_prior --config run.yaml [--set train_prior.workers=4]
"""

from __future__ import annotations

from typing import Optional

from .checkpoints import CaptionEncoder, init_source
from .run_config import RunConfig
from .stage import Stage, training_complete
from .training.driver import train
from .training.loop import training_loop
from .training.rows import planned_steps, training_plans
from .training.worker import Worker, rank_slice


def prior_loop(config: dict) -> None:
    """One Ray Train worker: stream this rank's batches, step, evaluate, checkpoint."""
    import torch

    from dalle2.metrics import prior_metrics
    from dalle2.prior import DiffusionPrior
    from dalle2.trainer import PriorTrainer
    from pipeline.loaders.batches import EmbeddingBatches

    run = RunConfig.model_validate(config)
    job = run.train_prior
    worker = Worker(run, job)
    torch.manual_seed(job.seed)
    init, prior_config = init_source(run, "train_prior")
    train_plan, eval_plan = training_plans(run, "train_prior")  # never the held-out rows; evaluated on them
    loader = EmbeddingBatches(run.root, train_plan, job.batch_size, worker.rank, worker.world_size, job.seed, job.shuffle_buffer)
    trainer = PriorTrainer(DiffusionPrior(config=prior_config), job.trainer, device=worker.device,
                           planned_steps=planned_steps(job, loader), parallel=job.parallel)
    encoder = None
    if prior_config.condition_on_text_encodings:  # per-token text features from the captions, step by step
        encoder = CaptionEncoder(run, worker.device, job.trainer.amp)
        encoder.check(prior_config.net.resolved_text_encoding_dim, prior_config.net.max_text_len,
                      "train_prior.prior.net.text_encoding_dim / max_text_len")
    state = worker.resume(trainer.load)
    if init and trainer.step == 0:  # nothing of its own to resume: start from init_from's weights
        trainer.init_weights(init)
    held_out = None if not eval_plan.size else next(
        EmbeddingBatches(run.root, eval_plan, eval_plan.size, shuffle_buffer=1).epoch(0))

    def conditioning(batch: dict) -> dict:
        text = encoder(batch["caption"]) if encoder is not None else {}
        return {"text_embed": batch["text_embed"].to(worker.device), **text}

    def train_step(batch: dict) -> float:
        return trainer.train_step({**conditioning(batch), "image_embed": batch["image_embed"], "seeds": batch["seed"]})

    # each rank evaluates its share, pooled after (no held-out rows: no evaluation, on every rank alike)
    mine = rank_slice(held_out, worker.rank, worker.world_size) if held_out is not None else None

    def evaluate(step: int) -> dict:
        if mine is None:
            return {}
        count = len(mine["image_embed"])
        metrics = {}
        if count >= 2:
            metrics = prior_metrics(trainer.sample, image_embed=mine["image_embed"].to(worker.device), **conditioning(mine),
                                    **run.sampling.prior_kwargs())
            metrics["val_loss"] = trainer.validation_loss(
                {**conditioning(mine), "image_embed": mine["image_embed"], "seeds": mine["seed"]})
        return worker.pooled(metrics, count)

    training_loop(worker, job, trainer, loader, train_step, evaluate, state)


STAGE = Stage("train-prior", "train the diffusion prior on the aligned embeddings",
              run=lambda config, session: train(config, session, prior_loop, "train_prior"),
              complete=lambda run: training_complete(run, "train_prior"))


def main(argv: Optional[list[str]] = None) -> dict:
    """Train the prior of the run described by --config."""
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
