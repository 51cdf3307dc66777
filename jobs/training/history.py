"""What a training job leaves beside its checkpoints: rank 0's curves (metrics.jsonl, progress.json) and, when
asked for, the keys of every batch each rank trained on."""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline.run.layout import TrainLayout


class MetricsHistory:
    """Rank 0's curves of a job, `<root>/train/<job>/metrics.jsonl`: one line per logged step (loss) and per
    evaluation (its metrics). A resumed run keeps the lines up to the step it resumes from."""

    def __init__(self, worker, resumed_from: int):
        self.layout, self.job_name = TrainLayout(worker.root), worker.job_name
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

            write_json(self.layout.progress(self.job_name), {"step": step, "loss": loss})

    def flush(self) -> None:
        if self.active:
            from pipeline.run.storage import write_atomic

            write_atomic(self.layout.history(self.job_name), "".join(json.dumps(line) + "\n" for line in self.lines).encode())


def read_history(root: str, job_name: str) -> list[dict]:
    """The lines of a job's metrics.jsonl ([] when it has none)."""
    from pipeline.run.storage import exists, read_bytes

    path = TrainLayout(root).history(job_name)
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
