"""Experiment tracking from rank 0 of a training job: MLflow through Ray Train's `setup_mlflow` and W&B through its
`setup_wandb` (params: the job's config; metrics: every report; artifacts: the run config and the sample grids), and
TensorBoard on any fsspec root (on an object store, events written locally and copied to
`<root>/train/<job>/tensorboard` every minute and at the end; an offline W&B run likewise, at the end).

A job keeps one MLflow run and one W&B run: their ids are kept beside the checkpoints (`train/<job>/mlflow_run.json`,
`wandb_run.json`), so a restart after a failure or a re-run with more steps continues them; a job that fails ends
them FAILED."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from typing import Any, Optional

from pipeline.run.layout import TrainLayout

log = logging.getLogger(__name__)

ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"  # MLflow 3 refuses its file store (maintenance mode) unless this is set
COPY_EVERY_S = 60.0  # an object store's TensorBoard copy: the whole events file again, so not at every report


def mlflow_tracking_uri(root: str, configured: Optional[str]) -> str:
    """The configured tracking URI, else a file store at `<root>/mlruns` (a local root's)."""
    if configured:
        return configured
    return "file://" + os.path.join(root, "mlruns")


def experiment_name(run) -> str:
    """The run's MLflow experiment and W&B group: tracking.experiment, else the root's folder name."""
    return run.tracking.experiment or os.path.basename(run.root.rstrip("/")) or "dalle2"


class Tracker:
    """Rank 0's trackers of one job; every method is a no-op on the other ranks and for trackers not asked for."""

    def __init__(self, run, job, rank: int):
        """`job`: the job's section of the run config (a TrainJobConfig), whose settings MLflow records."""
        self.root, self.job_name, self.rank = run.root, job.job_name, rank
        self.mlflow = self.wandb = None
        self.writer, self._tensorboard_local, self._copied_at, self._wandb_local = None, None, 0.0, None
        if rank != 0:
            return
        self._start_tensorboard()
        if run.tracking.mlflow:
            self._start_mlflow(run, job)
        if run.tracking.wandb:
            self._start_wandb(run, job)

    def _start_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        target = TrainLayout(self.root).tensorboard(self.job_name)
        if "://" in self.root:  # TensorBoard writes local files: kept in a temporary folder, copied at each flush
            self._tensorboard_local = tempfile.mkdtemp(prefix="tensorboard-")
            target = self._tensorboard_local
        self.writer = SummaryWriter(target)

    def _start_mlflow(self, run, job) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        from pipeline.run.storage import exists, read_json, write_json

        uri = mlflow_tracking_uri(self.root, run.tracking.mlflow_tracking_uri)
        if uri.startswith("file:"):
            os.environ.setdefault(ALLOW_FILE_STORE, "true")
        experiment = experiment_name(run)
        job_name, pointer = self.job_name, TrainLayout(self.root).mlflow_run(self.job_name)
        earlier = read_json(pointer) if exists(pointer) else None
        if earlier and earlier.get("tracking_uri") == uri:  # this job's run: continued
            import mlflow

            mlflow.set_tracking_uri(uri)
            mlflow.start_run(run_id=earlier["run_id"])
            self.mlflow = mlflow
        else:
            self.mlflow = setup_mlflow(job.model_dump(mode="json"), tracking_uri=uri, experiment_name=experiment,
                                       run_name=job_name, create_experiment_if_not_exists=True,
                                       tags={"dalle2.root": self.root, "dalle2.job": job_name})
            write_json(pointer, {"run_id": self.mlflow.active_run().info.run_id, "tracking_uri": uri})
        self.artifact("config.yaml", _yaml(run.model_dump(mode="json")))
        log.info("%s: MLflow run %s in experiment %r at %s", job_name, self.mlflow.active_run().info.run_id,
                 experiment, uri)

    def _start_wandb(self, run, job) -> None:
        from ray.air.integrations.wandb import setup_wandb

        from pipeline.run.storage import exists, read_json, write_json

        tracking = run.tracking
        folder = TrainLayout(self.root).job(self.job_name)  # wandb writes <folder>/wandb/<its run>
        if "://" in self.root:
            self._wandb_local = folder = tempfile.mkdtemp(prefix="wandb-")
        else:
            os.makedirs(folder, exist_ok=True)
        pointer = TrainLayout(self.root).wandb_run(self.job_name)
        earlier = read_json(pointer) if exists(pointer) else None
        run_id = earlier["run_id"] if earlier else uuid.uuid4().hex[:12]
        experiment = experiment_name(run)
        project = tracking.wandb_project or experiment
        # Ray's setup_wandb asks for no API key when WANDB_MODE says offline: set for the call alone
        previous = os.environ.get("WANDB_MODE")
        os.environ["WANDB_MODE"] = tracking.wandb_mode
        try:
            self.wandb = setup_wandb(job.model_dump(mode="json"), trial_id=run_id, trial_name=self.job_name,
                                     project=project, group=experiment, dir=folder,
                                     mode=tracking.wandb_mode, resume="allow", tags=[self.job_name])
        finally:
            if previous is None:
                os.environ.pop("WANDB_MODE", None)
            else:
                os.environ["WANDB_MODE"] = previous
        write_json(pointer, {"run_id": run_id, "project": project})
        self._wandb_file("run.yaml", _yaml(run.model_dump(mode="json")))  # W&B's own config.yaml is its settings
        log.info("%s: W&B run %s (%s) in project %r under %s", self.job_name, run_id, tracking.wandb_mode,
                 project, folder)

    def metrics(self, metrics: dict[str, Any]) -> None:
        """Numeric metrics of one report, at its step."""
        if self.rank != 0:
            return
        step = int(metrics.get("step", 0))
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        if self._tensorboard_local and time.monotonic() - self._copied_at > COPY_EVERY_S:
            self._copy_tensorboard()
        if self.mlflow is not None and numbers:
            self.mlflow.log_metrics(numbers, step=step)
        if self.wandb is not None and numbers:
            self.wandb.log(numbers, step=step)

    def artifact(self, name: str, data: bytes, step: Optional[int] = None) -> None:
        """A file (a sample grid, the config) under the MLflow run's artifacts and the W&B run's files, by `name`
        (folders allowed); a W&B image too for a png, at `step` (that of the evaluation that drew it)."""
        if self.mlflow is None and self.wandb is None:
            return
        folder, base = os.path.split(name)
        with tempfile.TemporaryDirectory() as local:
            path = os.path.join(local, base)
            with open(path, "wb") as f:
                f.write(data)
            if self.mlflow is not None:
                self.mlflow.log_artifact(path, folder or None)
            if self.wandb is not None:
                if name.endswith(".png"):
                    import wandb

                    self.wandb.log({folder or "image": wandb.Image(path, caption=name)}, step=step)
                self._wandb_file(name, data)

    def _wandb_file(self, name: str, data: bytes) -> None:
        """A file in the W&B run's files folder (uploaded with it, or by `wandb sync`)."""
        kept = os.path.join(self.wandb.dir, name)
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        with open(kept, "wb") as f:
            f.write(data)

    def close(self, failed: bool = False) -> None:
        """Flush and end the trackers (the MLflow run ends FAILED when the job failed)."""
        if self.writer is not None:
            self.writer.close()
            if self._tensorboard_local:
                self._copy_tensorboard()
            self.writer = None
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.mlflow = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
            if self._wandb_local:  # an object store's root: the offline run copied beside the checkpoints
                import fsspec

                fs, path = fsspec.core.url_to_fs(f"{TrainLayout(self.root).job(self.job_name)}/wandb")
                local = os.path.join(self._wandb_local, "wandb")
                for entry in os.listdir(local):  # by name: a put into an existing folder would nest inside it
                    if os.path.islink(os.path.join(local, entry)):
                        continue  # wandb's latest-run link: the run folder is copied by its own name
                    fs.put(os.path.join(local, entry), f"{path}/{entry}", recursive=True)
                import shutil

                shutil.rmtree(self._wandb_local, ignore_errors=True)

    def _copy_tensorboard(self) -> None:
        from pipeline.run.storage import write_atomic

        target = TrainLayout(self.root).tensorboard(self.job_name)
        for name in os.listdir(self._tensorboard_local):
            with open(os.path.join(self._tensorboard_local, name), "rb") as f:
                write_atomic(f"{target}/{name}", f.read())
        self._copied_at = time.monotonic()


def _yaml(value: Any) -> bytes:
    import yaml

    return yaml.safe_dump(value).encode()
