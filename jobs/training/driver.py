"""The driver side of a training job: Ray Train's TorchTrainer (the standard loop: `ray.train.get_checkpoint()` to
resume, `ray.train.report(metrics, checkpoint=...)` to save, the last K checkpoints kept in `<root>/train/<job>/`,
local or s3), and one progress bar that follows rank 0's step."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Callable, Optional

from pipeline.execution.session import RaySession, require_session
from pipeline.run.layout import TrainLayout

from .config import TrainJobConfig

log = logging.getLogger(__name__)


def train(config, session: RaySession, loop: Callable[[dict], None], section: str) -> dict:
    """A training stage: the run's held-out rows fixed, enough rows checked, Ray connected, `loop` fitted on the
    `section` job's workers; returns its final metrics."""
    from pipeline.stages.holdout import ensure_holdout

    from ..checkpoints import training_jobs
    from .rows import check_enough_rows

    require_session(session, f"{section}: train")
    job = getattr(config, section)
    # fixed before the first training stage, read by the rest
    imported = set(TrainLayout.IMPORTED.values())  # weights from elsewhere: they never saw this run's rows
    ensure_holdout(config.root, config.holdout, trained=tuple(j for j in training_jobs(config.root) if j not in imported))
    check_enough_rows(config, section)
    parts = 1  # the networks the job's trainer optimises, each with its own learning rate
    if section in ("train_prior", "train_decoder"):
        from ..checkpoints import init_source

        # an init_from that cannot start this job is refused before any worker starts
        _, model_config = init_source(config, section, driver=True)
        parts = len(model_config.unets) if section == "train_decoder" else 1
    check_per_part_settings(job, section, parts)
    session.connect(job.resources_per_worker, f"{section}.resources_per_worker")
    return fit(job.job_name, loop, config.model_dump(mode="json"), job, config.root, session)


def check_per_part_settings(job: TrainJobConfig, section: str, parts: int) -> None:
    """Refuse, naming the field, a list of learning rates of another length than the networks it is for."""
    from ..config_io import ConfigError

    for name, value in (("lr", job.trainer.lr), ("min_lr", job.trainer.min_lr)):
        if isinstance(value, list) and len(value) != parts:
            what = f"one per unet of the decoder ({parts})" if section == "train_decoder" else "one value"
            raise ConfigError(f"{section}.trainer.{name} has {len(value)} values: give {what}")


def fit(job_name: str, loop: Callable[[dict], None], loop_config: dict, job: TrainJobConfig, root: str,
        session: RaySession) -> dict:
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
            storage_path=TrainLayout(root).storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
        ),
    )
    with follow_progress(TrainLayout(root).progress(job_name), job_name, job.max_steps), session.preemption_watcher_off():
        result = trainer.fit()
    metrics = dict(result.metrics or {})
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    from pipeline.run.storage import write_json

    write_json(TrainLayout(root).summary(job_name), metrics)
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
