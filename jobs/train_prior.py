"""Train the diffusion prior on Ray Train from the run's aligned embeddings.

    python -m jobs.train_prior --config run.yaml [--set train_prior.workers=4]
"""

from __future__ import annotations

from typing import Optional

from .run_config import RunConfig, stage_main
from .train_common import Worker, fit

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
    resumed_from = trainer.steps[0]

    train_plan, eval_plan = SamplePlan.from_aligned(run.root).split(job.eval_size)
    loader = EmbeddingBatches(run.root, train_plan, job.batch_size, worker.rank, worker.world_size, job.seed, job.shuffle_buffer)
    held_out = next(EmbeddingBatches(run.root, eval_plan, max(eval_plan.size, 2), shuffle_buffer=1).epoch(0))

    def save(folder: str, epoch: int, position: int) -> None:
        trainer.save(folder, extra={"epoch": epoch, "batch": position})

    epoch, position = state.get("epoch", 0), state.get("batch", 0)
    step = trainer.steps[0]
    metrics: dict = {}
    while epoch < job.epochs and not (job.max_steps and step >= job.max_steps):
        for batch in loader.epoch(epoch, skip_batches=position):
            position += 1
            loss = trainer.train_step({"text_embed": batch["text_embed"], "image_embed": batch["image_embed"]})
            step = trainer.steps[0]
            finished = bool(job.max_steps and step >= job.max_steps)
            end_of_epoch = position == loader.batches_per_epoch()
            metrics = {"step": step, "epoch": epoch, "loss": loss, "resumed_from_step": resumed_from}
            if step % job.eval_every == 0 or finished or end_of_epoch:
                metrics.update(prior_metrics(trainer.sample, held_out["text_embed"].to(worker.device),
                                             held_out["image_embed"].to(worker.device)))
            if step % job.checkpoint_every == 0 or finished or end_of_epoch:
                next_epoch, next_position = (epoch + 1, 0) if end_of_epoch else (epoch, position)
                worker.report(metrics, save=lambda folder: save(folder, next_epoch, next_position))
            if finished:
                break
        epoch, position = epoch + 1, 0


def main(argv: Optional[list[str]] = None) -> dict:
    """Train the prior of the run described by --config."""

    def run(config: RunConfig) -> dict:
        from pipeline.distributor import ensure_ray

        ensure_ray(config.ray)
        return fit(JOB, prior_loop, config.model_dump(mode="json"), config.train_prior, config.root)

    return stage_main(argv, __doc__.splitlines()[0], run)


if __name__ == "__main__":
    main()
