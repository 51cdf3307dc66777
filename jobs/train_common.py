"""What every Ray Train job shares: scaling and failure settings, the TorchTrainer, and the worker side
(rank, resume, checkpoint reporting, TensorBoard, the summary JSON).

The training loops follow Ray Train's standard shape: `ray.train.get_checkpoint()` to resume,
`ray.train.report(metrics, checkpoint=...)` to save, with Ray keeping the last K checkpoints in the
run's storage (`<root>/train/<job>/`, local or s3).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, Optional, Union

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from dalle2.configs import StrictModel, TrainerConfig
from pipeline.run.config import Resources

log = logging.getLogger(__name__)


class TrainJobConfig(StrictModel):
    """Settings shared by train_clip, train_prior and train_decoder."""

    workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    resources_per_worker: Resources = {}  # custom resources, e.g. {gpu_pool: 0.001}: workers on the GPU node type
    max_failures: int = Field(default=1, ge=-1)  # a crashed worker restarts from its latest checkpoint this many times (-1: always)
    keep_checkpoints: PositiveInt = 2
    epochs: PositiveInt = 1
    max_steps: Optional[PositiveInt] = None  # stop early after this many optimizer steps in total
    batch_size: PositiveInt = 32
    eval_every: PositiveInt = 50
    eval_size: PositiveInt = 32  # held-out rows (the run's holdout section) each evaluation reads, at most
    checkpoint_every: PositiveInt = 50
    log_every: PositiveInt = 20  # a progress line (step, loss, steps/s) from rank 0
    shuffle_buffer: PositiveInt = 256
    seed: NonNegativeInt = 0
    trainer: TrainerConfig = TrainerConfig()
    torch_threads: PositiveInt = Field(default=1, description="torch threads per worker (CPU training)")


class TrainPriorConfig(TrainJobConfig):
    """The prior's training job."""

    prior: Union[str, dict] = "tiny"  # a registered architecture (dalle2/model_configs/prior) or a dict

    @property
    def job_name(self) -> str:
        """Where this job's checkpoints go: <root>/train/prior."""
        return "prior"


class TrainDecoderConfig(TrainJobConfig):
    """The decoder's training job."""

    decoder: Union[str, dict] = "tiny"  # a registered architecture (dalle2/model_configs/decoder) or a dict
    unet_number: Optional[PositiveInt] = None  # train this stage only; None: every stage, in turn, batch by batch
    eval_samples: PositiveInt = 8  # held-out embeddings drawn into the sample grid
    cond_scale: float = 1.0

    @property
    def job_name(self) -> str:
        """Where this job's checkpoints go: `decoder` for the whole cascade, `decoder_unet{k}` for stage k alone,
        so stages trained by separate jobs (each on the GPUs it needs) never resume from each other."""
        return "decoder" if self.unet_number is None else f"decoder_unet{self.unet_number}"


class TrainClipConfig(TrainJobConfig):
    """The CLIP training job (contrastive, on the run's shards)."""

    enabled: bool = True  # False when embed.clip names a pretrained CLIP to use instead
    model_name: str = "tiny-clip"  # an open_clip architecture (ours in dalle2/model_configs/clip or open_clip's)

    @property
    def job_name(self) -> str:
        """Where this job's checkpoints go: <root>/train/clip."""
        return "clip"


def storage_path(root: str) -> str:
    """Where Ray Train keeps checkpoints of the run: <root>/train (an absolute path when local)."""
    return root.rstrip("/") + "/train" if "://" in root else os.path.abspath(os.path.join(root, "train"))


def fit(job_name: str, loop: Callable[[dict], None], loop_config: dict, job: TrainJobConfig, root: str) -> dict:
    """Run `loop` on `job.workers` Ray Train workers; returns the final metrics (also written as JSON)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": job.cpus_per_worker, **job.resources_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=job_name,
            storage_path=storage_path(root),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
        ),
    )
    from pipeline.execution.distributor import preemption_watcher_off_when_embedded

    with follow_progress(f"{storage_path(root)}/{job_name}/progress.json", job_name, job.max_steps), \
            preemption_watcher_off_when_embedded():
        result = trainer.fit()
    metrics = dict(result.metrics or {})
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    from pipeline.run.storage import write_json

    write_json(f"{storage_path(root)}/{job_name}_summary.json", metrics)
    log.info("%s finished: %s", job_name, json.dumps(metrics, default=str))
    return metrics


@contextlib.contextmanager
def follow_progress(path: str, job_name: str, total: Optional[int]):
    """A progress bar in the driver that follows the step rank 0 writes to `path` (Ray's worker output is not
    shown here unless asked for), while the body runs."""
    import threading

    from pipeline.execution.console import progress_bar
    from pipeline.run.storage import exists, read_json

    stop = threading.Event()
    bar = progress_bar(total=total, desc=job_name, unit="step")

    def update() -> None:
        try:
            state = read_json(path) if exists(path) else None
        except Exception:  # noqa: BLE001 - half written or not there yet: the next look will do
            return
        if state and state["step"] > bar.n:
            bar.update(state["step"] - bar.n)
            bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)

    def follow() -> None:
        while not stop.wait(2.0):
            update()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        update()
        bar.close()


def latest_checkpoint(root: str, job_name: str, skip: tuple[str, ...] = ()) -> Optional[str]:
    """The newest complete checkpoint folder of a job (its COMPLETE marker there and its files matching it), of
    those its summary names and its run folder lists; incomplete ones (a crash mid-save) are passed over with a
    warning naming them, and those in `skip` silently."""
    from dalle2.checkpoint import incomplete_reason
    from pipeline.run.storage import exists, list_files, read_json

    from .checkpoints import with_scheme

    summary = f"{storage_path(root)}/{job_name}_summary.json"
    found = {with_scheme(root, p).rstrip("/") for p in list_files(f"{storage_path(root)}/{job_name}")
             if p.rsplit("/", 1)[-1].startswith("checkpoint_") and not p.endswith(".json")}
    if exists(summary) and read_json(summary).get("checkpoint"):
        found.add(with_scheme(root, read_json(summary)["checkpoint"]).rstrip("/"))
    # Ray names checkpoints by the time they were made: the newest first, whichever run made it
    for candidate in sorted(found - {s.rstrip("/") for s in skip}, key=lambda p: p.rsplit("/", 1)[-1], reverse=True):
        reason = incomplete_reason(candidate)
        if reason is None:
            return candidate
        log.warning("%s: checkpoint %s is passed over: %s", job_name, candidate, reason)
    return None


def training_jobs(root: str) -> list[str]:
    """The training jobs that finished at least once in this run (clip, prior, decoder, decoder_unet2, ...)."""
    from pipeline.run.storage import list_files

    names = [url.rsplit("/", 1)[-1][: -len("_summary.json")] for url in list_files(storage_path(root), "_summary.json")]
    order = {"clip": 0, "prior": 1}
    return sorted(names, key=lambda name: (order.get(name, 2), name))


class Worker:
    """The per-worker side of a job: rank, device, resume state, reporting."""

    def __init__(self, job: TrainJobConfig, root: str, job_name: str):
        import ray.train
        import torch

        from pipeline.execution.console import setup_logging

        setup_logging()
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.job, self.root, self.job_name = job, root, job_name
        if not job.use_gpu:
            torch.set_num_threads(job.torch_threads)
        from ray.train.torch import get_device

        self.device = get_device()
        self.writer = None
        if self.rank == 0 and "://" not in root:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(storage_path(root), job_name, "tensorboard"))

    def resume(self, load: Callable[[str], dict]) -> dict:
        """Load the checkpoint Ray hands back (a re-run or a restart after a failure); when Ray has none (a worker
        killed before Ray registered it) or it is incomplete (no COMPLETE marker, or files that do not match it),
        the newest complete one on disk instead, else start from scratch."""
        import ray.train

        from dalle2.checkpoint import IncompleteCheckpointError

        from .checkpoints import with_scheme

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            try:
                with checkpoint.as_directory() as folder:
                    extra = load(folder)
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
        """Report metrics on every rank; with `save`, rank 0 also writes a checkpoint through Ray."""
        import ray.train

        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, metrics.get("step", 0))
            self.writer.flush()
        if save is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                save(folder)
                from dalle2.faults import crash_point

                crash_point("train.mid_checkpoint")  # written locally, not yet persisted by Ray
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            from .checkpoints import upload_checkpoint

            # our upload, not Ray's copy: each file whole, the COMPLETE marker last
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_upload_fn=lambda local, name: upload_checkpoint(self.root, local, name))


def training_loop(worker: Worker, job: TrainJobConfig, trainer, loader, train_step: Callable[[dict], float],
                  evaluate: Callable[[int], dict], state: dict) -> None:
    """The loop every job runs: epochs of this rank's batches from the resumed position; evaluate every
    `eval_every` optimizer steps, checkpoint every `checkpoint_every` and at the end (with the data position,
    so a resumed run sees exactly the batches an uninterrupted one would), stop at `max_steps` or after
    `epochs`. With gradient accumulation a step spans several batches: nothing is done between them."""
    import time

    from dalle2.faults import crash_point

    resumed_from = trainer.step
    epoch, position = state.get("epoch", 0), state.get("batch", 0)
    step = trainer.step
    last_log, last_log_step = time.time(), step
    trace, history = SampleTrace(worker.rank), MetricsHistory(worker, resumed_from)
    while epoch < job.epochs and not (job.max_steps and step >= job.max_steps):
        for batch in loader.epoch(epoch, skip_batches=position):
            position += 1
            loss = train_step(batch)
            stepped, step = trainer.step != step, trainer.step
            trace.add(step, batch.get("key", []))
            crash_point("train.mid_step")
            end_of_epoch = position == loader.batches_per_epoch()
            finished = bool(job.max_steps and step >= job.max_steps) or (end_of_epoch and epoch == job.epochs - 1)
            if not stepped and not finished:
                continue  # accumulating: the optimizer step (and its eval / checkpoint) comes with a later batch
            metrics = {"step": step, "epoch": epoch, "loss": loss, "resumed_from_step": resumed_from}
            if worker.rank == 0 and (step % job.log_every == 0 or finished):
                rate = (step - last_log_step) / max(time.time() - last_log, 1e-9)
                log.info("%s: step %d/%s epoch %d loss %.4f (%.2f steps/s)", worker.job_name, step,
                         job.max_steps or "?", epoch, loss, rate)
                last_log, last_log_step = time.time(), step
                history.add(step=step, loss=loss)
                history.progress(step=step, loss=loss)
            evaluated = step % job.eval_every == 0 or finished  # the last report (the run's summary) has one
            if evaluated:
                metrics.update(evaluate(step), eval_step=step)
                history.add(**{k: v for k, v in metrics.items() if k not in ("epoch", "resumed_from_step", "eval_step")})
            if evaluated or step % job.checkpoint_every == 0:
                history.flush()
            if step % job.checkpoint_every == 0 or finished:
                # the data position to resume from: the next batch (or the next epoch's first)
                extra = {"epoch": epoch + 1, "batch": 0} if end_of_epoch else {"epoch": epoch, "batch": position}
                worker.report(metrics, save=lambda folder: trainer.save(folder, extra=extra))
            elif evaluated:  # reported on its own, so every evaluation reaches the logs
                worker.report(metrics)
            if finished:
                break
        epoch, position = epoch + 1, 0


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


class MetricsHistory:
    """Rank 0's curves of a job, `<root>/train/<job>/metrics.jsonl`: one line per logged step (loss) and per
    evaluation (its metrics). A resumed run keeps the lines up to the step it resumes from."""

    def __init__(self, worker: "Worker", resumed_from: int):
        self.path = history_path(worker.root, worker.job_name)
        self.active, self.lines = worker.rank == 0, []
        if self.active and resumed_from:
            self.lines = [line for line in read_history(worker.root, worker.job_name) if line.get("step", 0) <= resumed_from]

    def add(self, **values: Any) -> None:
        if self.active:
            self.lines.append({k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def progress(self, step: int, loss: float) -> None:
        """The latest step and loss, for the driver's progress bar (`progress.json` beside metrics.jsonl)."""
        if self.active:
            from pipeline.run.storage import write_json

            write_json(self.path.rsplit("/", 1)[0] + "/progress.json", {"step": step, "loss": loss})

    def flush(self) -> None:
        if self.active:
            from pipeline.run.storage import write_atomic

            write_atomic(self.path, "".join(json.dumps(line) + "\n" for line in self.lines).encode())


def history_path(root: str, job_name: str) -> str:
    return f"{storage_path(root)}/{job_name}/metrics.jsonl"


def read_history(root: str, job_name: str) -> list[dict]:
    """The lines of a job's metrics.jsonl ([] when it has none)."""
    from pipeline.run.storage import exists, read_bytes

    path = history_path(root, job_name)
    if not exists(path):
        return []
    return [json.loads(line) for line in read_bytes(path).decode().splitlines() if line.strip()]


class SampleTrace:
    """With DALLE2_TRACE_SAMPLES=<folder>, each rank appends (step, keys) of every batch it trains on to
    <folder>/rank<r>.jsonl: which samples each step saw, e.g. to check that a resumed run sees the same."""

    ENV = "DALLE2_TRACE_SAMPLES"

    def __init__(self, rank: int):
        folder = os.environ.get(self.ENV)
        self.path = os.path.join(folder, f"rank{rank}.jsonl") if folder else None
        if self.path:
            os.makedirs(folder, exist_ok=True)

    def add(self, step: int, keys: list[str]) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")


def train_main(argv: Optional[list[str]], doc: str, loop: Callable[[dict], None], section: str) -> dict:
    """The main(argv) of a training job: validate the run config, start Ray, fit `loop`, print the summary."""
    from .run_config import RunConfig, stage_main

    def run(config: RunConfig) -> dict:
        from pipeline.execution.distributor import ensure_ray
        from pipeline.stages.holdout import ensure_holdout

        from .training_rows import check_enough_rows

        job = getattr(config, section)
        # fixed before the first training stage, read by the rest
        ensure_holdout(config.root, config.holdout, trained=tuple(training_jobs(config.root)))
        check_enough_rows(config, section)
        ensure_ray(config.ray, job.resources_per_worker, f"{section}.resources_per_worker")
        return fit(job.job_name, loop, config.model_dump(mode="json"), job, config.root)

    return stage_main(argv, doc.splitlines()[0], run)
