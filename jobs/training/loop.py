"""The training loop every job (clip, prior, decoder) runs on each Ray Train worker."""

from __future__ import annotations

import logging
from typing import Callable

from .best import BestCheckpoint
from .cadence import Cadence
from .config import TrainJobConfig
from .history import MetricsHistory, SampleTrace
from .worker import Worker

log = logging.getLogger(__name__)


def training_loop(worker: Worker, job: TrainJobConfig, trainer, loader, train_step: Callable[[dict], float],
                  evaluate: Callable[[int], dict], state: dict) -> None:
    """The loop every job runs: epochs of this rank's batches from the resumed position, with what the job's
    `Cadence` says after each optimizer step (log, evaluate, checkpoint with the data position, so a resumed run
    sees exactly the batches an uninterrupted one would; stop)."""
    try:
        _loop(worker, job, trainer, loader, train_step, evaluate, state)
    except BaseException:
        worker.tracker.close(failed=True)  # the MLflow run ends FAILED, not RUNNING for ever
        raise
    finally:
        trainer.close()  # before Ray Train destroys the process group
    worker.tracker.close()


def _loop(worker: Worker, job: TrainJobConfig, trainer, loader, train_step: Callable[[dict], float],
          evaluate: Callable[[int], dict], state: dict) -> None:
    import time

    from dalle2.faults import crash_point

    cadence = Cadence.of(job)
    resumed_from = trainer.step
    # the epoch may have begun on another number of workers: `earlier` says what they trained, the loader the rest
    epoch, earlier, skip = cadence.resumed_at(state, worker.world_size)
    position = sum(batches for _, batches in earlier) + skip  # batches of the epoch trained, on any world size
    if earlier:
        log.info("%s: epoch %d began on %s workers, resumed on %d: each trains its share of the %d batches left",
                 worker.job_name, epoch, "/".join(str(size) for size, _ in earlier), worker.world_size,
                 loader.batches_per_epoch(earlier, epoch) - position)
    step = since = trainer.step  # since: the step of the last batch that stepped with nothing left accumulating
    last_log, last_log_step = time.time(), step
    trace, history = SampleTrace(worker.rank), MetricsHistory(worker, resumed_from)
    best = BestCheckpoint(worker.root, worker.job_name, worker.rank) if job.keep_best else None
    if best is not None:  # rank 0's: each rank must take the same decisions (a sharded save needs them all)
        best.loss = worker.gathered(best.loss)[0]
    while not cadence.done(epoch, step):
        epoch_batches = loader.batches_per_epoch(earlier, epoch)
        for batch in loader.epoch(epoch, skip_batches=skip, earlier=earlier):
            position += 1
            loss = train_step(batch)
            # an optimizer step with no part left holding accumulated gradients: only there may it checkpoint (with
            # unets trained in turn, unet 1 steps while unet 2 still accumulates)
            stepped, step = trainer.step != step and not trainer.accumulating, trainer.step
            trace.add(step, batch.get("key", []))
            crash_point("train.mid_step")
            end_of_epoch = position == epoch_batches
            actions = cadence.after_batch(step=step, stepped=stepped, epoch=epoch, end_of_epoch=end_of_epoch,
                                          since=since, clean=not trainer.accumulating)
            if actions is None:
                continue  # accumulating: the optimizer step (and its eval / checkpoint) comes with a later batch
            since = step
            metrics = {"step": step, "epoch": epoch, "loss": loss, "resumed_from_step": resumed_from}
            if worker.rank == 0 and actions.log:
                rate = (step - last_log_step) / max(time.time() - last_log, 1e-9)
                log.info("%s: step %d/%s epoch %d loss %.4f (%.2f steps/s)", worker.job_name, step,
                         job.max_steps or "?", epoch, loss, rate)
                last_log, last_log_step = time.time(), step
                history.add(step=step, loss=loss)
                history.progress(step=step, loss=loss)
                if not (actions.evaluate or actions.checkpoint):  # those reports carry the loss to the trackers
                    worker.tracker.metrics({"step": step, "loss": loss})
            if actions.evaluate:  # the last report (the run's summary) has one
                with trainer.evaluating():  # every rank at once: sharded parts are gathered for it
                    metrics.update(evaluate(step), eval_step=step)
                if best is not None:
                    best.consider(step, metrics, save=lambda folder: trainer.save(folder, extra=cadence.resume_point(
                        epoch=epoch, position=position, end_of_epoch=end_of_epoch, earlier=earlier,
                        world_size=worker.world_size)))
                history.add(**{k: v for k, v in metrics.items() if k not in ("epoch", "resumed_from_step", "eval_step")})
            if actions.flush_history:
                history.flush()
            if actions.checkpoint:
                extra = cadence.resume_point(epoch=epoch, position=position, end_of_epoch=end_of_epoch,
                                             earlier=earlier, world_size=worker.world_size)
                worker.report(metrics, save=lambda folder: trainer.save(folder, extra=extra))
            elif actions.evaluate:  # reported on its own, so every evaluation reaches the logs
                worker.report(metrics)
            if actions.finished:
                break
        epoch, position, skip, earlier = epoch + 1, 0, 0, []
