"""The embed stage's clock: its start-up figures and steady rate, the summary's timing keys."""

from __future__ import annotations

import math
import time
from typing import Optional

from pipeline.stages.embed.rows import PartRow


class Clock:
    """Start-up (command start to CLIP's first embeddings), broken into its steps: the driver's marks as its steps
    end (planning, Ray's start), then the first CLIP actor's model loaded, then its first batch out, as the part
    rows tell; and the rate after it, which is what a long run sees (small runs are dominated by the start-up).
    Running figures only: nothing is kept per part."""

    def __init__(self) -> None:
        self.started = time.time()
        self.marks: dict[str, float] = {}
        self.shards_started: Optional[float] = None  # when the shards' work began (their records' seconds)
        self.first_at, self.rows_at_first, self.rows_total, self.last_at = math.inf, 0, 0, 0.0
        self.loaded_at = math.inf  # when the first CLIP actor had its model loaded

    def mark(self, name: str) -> None:
        """The driver's step `name` (e.g. "planning_s") ends now."""
        self.marks[name] = time.time()

    def start_shards(self) -> float:
        self.shards_started = time.time()
        return self.shards_started

    def saw(self, row: PartRow, counted: bool) -> None:
        """A row of the part stream; `counted`: a part whose samples counted (not a replay's)."""
        self.loaded_at = min(self.loaded_at, row.loaded_at)
        if not counted:
            return
        if row.first_at < self.first_at:
            self.first_at, self.rows_at_first = row.first_at, row.first_rows
        elif row.first_at == self.first_at:
            self.rows_at_first += row.first_rows
        self.rows_total, self.last_at = self.rows_total + row.rows, max(self.last_at, row.last_at)

    def summary(self) -> dict:
        """The summary's timing keys: startup_s, startup_steps and steady_rows_per_s ({} if nothing was embedded)."""
        if not self.rows_total:
            return {}
        later, span = self.rows_total - self.rows_at_first, self.last_at - self.first_at
        steps, previous = {}, self.started
        for name, at in (*self.marks.items(), ("model_load_s", self.loaded_at), ("first_batch_s", self.first_at)):
            steps[name], previous = round(max(0.0, at - previous), 2), at
        timing = {"startup_s": round(self.first_at - self.started, 2), "startup_steps": steps}
        if later:
            timing["steady_rows_per_s"] = round(later / span, 1) if span > 0 else None
        return timing
