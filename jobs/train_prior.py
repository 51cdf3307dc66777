"""Train the diffusion prior on Ray Train from the run's aligned embeddings.

    python -m jobs.train_prior --config run.yaml [--set train_prior.workers=4]
"""

from __future__ import annotations

from typing import Optional

from .run_config import RunConfig
from .train_common import Worker, train_main, training_loop

JOB = "prior"


def prior_loop(config: dict) -> None:
    """One Ray Train worker: stream this rank's batches, step, evaluate, checkpoint."""
    import torch

    from dalle2.configs import PriorConfig, resolve
    from dalle2.metrics import prior_metrics
    from dalle2.prior import DiffusionPrior
    from dalle2.trainer import PriorTrainer
    from pipeline.loaders import EmbeddingBatches, SamplePlan

    run = RunConfig.model_validate(config)
    job = run.train_prior
    worker = Worker(job, run.root, JOB)
    torch.manual_seed(job.seed)
    trainer = PriorTrainer(DiffusionPrior(config=resolve(PriorConfig, job.prior, "prior")), job.trainer, device=worker.device)
    state = worker.resume(trainer.load)
    train_plan, eval_plan = SamplePlan.from_aligned(run.root).split(job.eval_size)
    loader = EmbeddingBatches(run.root, train_plan, job.batch_size, worker.rank, worker.world_size, job.seed, job.shuffle_buffer)
    held_out = next(EmbeddingBatches(run.root, eval_plan, max(eval_plan.size, 2), shuffle_buffer=1).epoch(0))

    def train_step(batch: dict) -> float:
        return trainer.train_step({"text_embed": batch["text_embed"], "image_embed": batch["image_embed"]})

    def evaluate(step: int) -> dict:
        return prior_metrics(trainer.sample, held_out["text_embed"].to(worker.device), held_out["image_embed"].to(worker.device))

    training_loop(worker, job, trainer, loader, train_step, evaluate, state)


def main(argv: Optional[list[str]] = None) -> dict:
    """Train the prior of the run described by --config."""
    return train_main(argv, __doc__, JOB, prior_loop, "train_prior")


if __name__ == "__main__":
    main()
