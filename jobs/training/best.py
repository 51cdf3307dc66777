"""keep_best: the job's checkpoint with the lowest validation loss, kept beside Ray's last K (which Ray rotates by time).

Rank 0 writes it to `<job>/best/step_N_<id>` (the COMPLETE marker last), then points `<job>/best.json` at it (one atomic
write), then deletes the best folders it replaced: a crash at any point leaves the pointer on a complete checkpoint.
A resumed run reads the best loss so far from the pointer.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Callable, Optional

from pipeline.run.layout import TrainLayout

log = logging.getLogger(__name__)

METRIC = "val_loss"  # the held-out loss of the EMA weights (every evaluation reports it)


class BestCheckpoint:
    """Keeps the checkpoint of the lowest `val_loss` seen by a job's evaluations."""

    def __init__(self, root: str, job_name: str, rank: int):
        self.root, self.job_name, self.rank = root, job_name, rank
        pointer = read_best(root, job_name)
        self.loss = pointer[METRIC] if pointer else math.inf
        self.warned = False

    def consider(self, step: int, metrics: dict, save: Callable[[str], None]) -> bool:
        """After an evaluation: save the model when its `val_loss` beats the best so far; whether it did. Every
        rank gets the same pooled metrics, so every rank takes the same decision and calls `save` (rank 0 writes)."""
        loss = metrics.get(METRIC)
        if loss is None and not self.warned:
            self.warned = True
            log.warning("%s: keep_best keeps nothing: its evaluation at step %d has no %s (no held-out rows?)",
                        self.job_name, step, METRIC)
        if loss is None or not loss < self.loss:
            return False
        self.loss = loss
        layout = TrainLayout(self.root)
        # a folder of its own, never one the pointer may name: a resumed run replaying step N writes beside it
        folder = f"{layout.best_checkpoint(self.job_name, step)}_{uuid.uuid4().hex[:8]}"
        save(folder)  # every rank: a sharded model is gathered from all of them
        if self.rank == 0:
            from pipeline.run.storage import list_files, remove, write_json

            write_json(layout.best(self.job_name), {"checkpoint": folder, "step": step, METRIC: loss})
            for old in list_files(f"{layout.job(self.job_name)}/best"):
                if old.rstrip("/").rsplit("/", 1)[-1] != folder.rsplit("/", 1)[-1]:
                    remove(old, recursive=True)
            log.info("%s: best checkpoint so far at step %d (%s %.5f)", self.job_name, step, METRIC, loss)
        return True


def read_best(root: str, job_name: str) -> Optional[dict]:
    """The job's best-checkpoint pointer ({checkpoint, step, val_loss}), or None when it has kept none."""
    from pipeline.run.storage import exists, read_json

    path = TrainLayout(root).best(job_name)
    return read_json(path) if exists(path) else None
