"""When a training loop logs, evaluates, checkpoints and stops: a pure function of the step and the data position.

With gradient accumulation an optimizer step spans several batches; nothing happens between them. The last step
(max_steps, or the last batch of the last epoch) always evaluates and checkpoints, so a run's summary has both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from pipeline.loaders.shares import Segment


@dataclass(frozen=True)
class Actions:
    """What to do after one batch."""

    finished: bool  # the run's last step: stop after it
    log: bool  # a progress line and a point of the loss curve (rank 0)
    evaluate: bool
    checkpoint: bool  # report with a checkpoint; an evaluation without one is reported alone

    @property
    def flush_history(self) -> bool:
        """Whether the curves are written out: with each evaluation and each checkpoint."""
        return self.evaluate or self.checkpoint


@dataclass(frozen=True)
class Cadence:
    """A job's schedule: `epochs` / `max_steps` to stop, and every how many optimizer steps to log, evaluate and
    checkpoint."""

    epochs: int
    max_steps: Optional[int]
    eval_every: int
    checkpoint_every: int
    log_every: int

    @classmethod
    def of(cls, job) -> "Cadence":
        """The cadence of a TrainJobConfig."""
        return cls(epochs=job.epochs, max_steps=job.max_steps, eval_every=job.eval_every,
                   checkpoint_every=job.checkpoint_every, log_every=job.log_every)

    def done(self, epoch: int, step: int) -> bool:
        """Whether a run at `epoch` and optimizer `step` has nothing left to train (checked before each epoch)."""
        return epoch >= self.epochs or bool(self.max_steps and step >= self.max_steps)

    def after_batch(self, step: int, stepped: bool, epoch: int, end_of_epoch: bool,
                    since: Optional[int] = None, clean: bool = True) -> Optional[Actions]:
        """What follows a batch that left the optimizer at `step` (`stepped`: this batch completed a step); None
        while accumulating (no step, not the end). `since`: the step of the last batch that had stepped (default
        step - 1); an interval fires when one of its multiples lies in (since, step] (parts stepping in turn leave
        several steps between such batches). `clean`: no part holds gradients it has not stepped on; max_steps
        stops the run at the first such batch (its checkpoint would lose them)."""
        finished = (bool(self.max_steps and step >= self.max_steps) and clean) or (end_of_epoch and epoch == self.epochs - 1)
        if not stepped and not finished:
            return None
        since = step - 1 if since is None else since
        return Actions(finished=finished, log=step // self.log_every > since // self.log_every or finished,
                       evaluate=step // self.eval_every > since // self.eval_every or finished,
                       checkpoint=step // self.checkpoint_every > since // self.checkpoint_every or finished)

    @staticmethod
    def resume_point(epoch: int, position: int, end_of_epoch: bool, earlier: Sequence[Segment] = (),
                     world_size: Optional[int] = None) -> dict:
        """The data position a checkpoint saves: the next batch, or the next epoch's first. With `world_size`, the
        epoch's segments too (the batches each rank trained at each world size, `earlier` ones first), from which
        a resume on another number of workers finds what is left (pipeline/loaders/shares.py)."""
        point = {"epoch": epoch + 1, "batch": 0} if end_of_epoch else {"epoch": epoch, "batch": position}
        if world_size is not None and not end_of_epoch:
            here = position - sum(batches for _, batches in earlier)
            point["segments"] = [[size, batches] for size, batches in earlier] + [[world_size, here]]
        return point

    @staticmethod
    def resumed_at(point: dict, world_size: int) -> tuple[int, list[Segment], int]:
        """Where a saved data position resumes on `world_size` workers: (epoch, its earlier segments on other world
        sizes, batches of this world size's segment already trained)."""
        epoch, position = point.get("epoch", 0), point.get("batch", 0)
        segments = [(int(size), int(batches)) for size, batches in point.get("segments") or ()]
        if not segments:  # an epoch's start, or a checkpoint from before segments were saved
            if position:  # mid-epoch: saved before segments were kept
                import logging

                logging.getLogger(__name__).warning(
                    "the checkpoint's data position (epoch %d, batch %d) does not say how many workers trained it: "
                    "resumed on another number, this epoch's samples are split anew", epoch, position)
            return epoch, [], position
        if segments[-1][0] == world_size:
            return epoch, segments[:-1], segments[-1][1]
        return epoch, segments, 0
