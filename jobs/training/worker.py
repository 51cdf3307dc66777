"""The per-worker side of a training job: rank, device, resume, reporting and checkpoints through Ray Train, and
metrics pooled over ranks."""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Callable, Optional

from .config import TrainJobConfig

log = logging.getLogger(__name__)


class Worker:
    """The per-worker side of a job: rank, device, resume state, reporting."""

    def __init__(self, run, job: TrainJobConfig):
        import ray.train
        import torch

        from pipeline.execution.console import setup_logging

        from .tracking import Tracker

        setup_logging()
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.job, self.root, self.job_name = job, run.root, job.job_name
        if not job.use_gpu:
            torch.set_num_threads(job.torch_threads)
        from ray.train.torch import get_device

        self.device = get_device()
        self.tracker = Tracker(run, job, self.rank)  # TensorBoard, and MLflow when asked for

    def resume(self, load: Callable[[str], dict]) -> dict:
        """Load the checkpoint Ray hands back (a re-run or a restart after a failure); when Ray has none (a worker
        killed before Ray registered it) or it is incomplete (no COMPLETE marker, or files that do not match it),
        the newest complete one on disk instead, else start from scratch."""
        import ray.train

        from dalle2.checkpoint import IncompleteCheckpointError

        from ..checkpoints import latest_checkpoint, with_scheme

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            # read where Ray persisted it, not through as_directory: that is a local copy every rank of a node
            # shares, which one rank could read while another was still writing it (seen: rank 1 found state.pt
            # empty, resumed from an older step than rank 0, and the two waited on each other for ever)
            try:
                extra = load(with_scheme(self.root, checkpoint.path))
                log.info("rank %d resumed from %s at %s", self.rank, checkpoint.path, extra)
                return extra
            except IncompleteCheckpointError as error:
                log.warning("rank %d: %s", self.rank, error)
        skip = (with_scheme(self.root, checkpoint.path),) if checkpoint is not None else ()
        previous = latest_checkpoint(self.root, self.job_name, skip=skip)
        if previous is None:
            if checkpoint is not None:
                log.warning("rank %d: no complete checkpoint to resume from: starting from scratch", self.rank)
            return {}
        extra = load(previous)
        log.info("rank %d resumed from %s (the newest complete checkpoint on disk) at %s", self.rank, previous, extra)
        return extra

    def gathered(self, part: Any) -> list:
        """Every rank's `part`, in rank order (a collective: every rank must call it)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or self.world_size == 1:
            return [part]
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, part)
        return parts

    def pooled(self, metrics: dict[str, float], count: int) -> dict[str, float]:
        """Metrics each rank computed on its own `count` held-out samples, averaged over all ranks by count."""
        return pool_metrics(self.gathered((metrics, count)))

    def report(self, metrics: dict[str, Any], save: Optional[Callable[[str], None]] = None) -> None:
        """Report metrics on every rank; with `save` (called on every rank: a sharded model is gathered from all of
        them), rank 0 also writes a checkpoint through Ray."""
        import ray.train

        self.tracker.metrics(metrics)
        if save is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            save(folder)  # written by rank 0 alone
            if self.rank == 0:
                from dalle2.faults import crash_point

                crash_point("train.mid_checkpoint")  # written locally, not yet persisted by Ray
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            from ..checkpoints import upload_checkpoint

            # our upload, not Ray's copy: each file whole, the COMPLETE marker last
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_upload_fn=lambda local, name: upload_checkpoint(self.root, local, name))


def pool_metrics(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """The count-weighted mean of each metric over (metrics, count) pairs (ranks with no samples add nothing)."""
    total = sum(count for metrics, count in parts if metrics)
    keys = {key for metrics, _ in parts for key in metrics}
    return {key: sum(m[key] * count for m, count in parts if key in m) / total for key in sorted(keys)} if total else {}


def rank_slice(batch: dict, rank: int, world_size: int) -> dict:
    """This rank's share of a held-out batch (every world_size-th row from `rank`)."""
    return {k: v[rank::world_size] for k, v in batch.items()}


def unslice(parts: list):
    """Every rank's `rank_slice` share (a tensor, or None for a rank that had no rows), in rank order, back
    in the held-out batch's order."""
    import torch

    rows = sum(len(part) for part in parts if part is not None)
    order = torch.cat([torch.arange(rank, rows, len(parts)) for rank in range(len(parts))])
    stacked = torch.cat([part for part in parts if part is not None])
    whole = torch.empty_like(stacked)
    whole[order] = stacked
    return whole
