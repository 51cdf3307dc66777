"""The embed driver's bookkeeping of the part stream (rows.py's PartRow): which scratch parts each shard has, how
many of its samples they hold, and when a shard is ready to be finished. Pure accounting: it starts no task and
reads no clock; the driver (stage.py) starts the finish tasks and tells it how each one ended."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Optional

from pipeline.formats.queries import ShardInfo
from pipeline.stages.embed.rows import END, FAILED, PartRow

log = logging.getLogger(__name__)


class ShardTracker:
    """A shard is ready once its END row (the samples its tar held) has come and parts holding that many samples
    have too, whichever came first; it is then released, with its parts, and rows of it that come later are
    replays of work already counted (a retried write task). A FAILED row fails its shard; a shard whose tar held
    other than the samples its parquet lists fails when released."""

    def __init__(self, infos: dict[str, ShardInfo]):
        self.infos = infos
        self.parts: dict[str, list[str]] = defaultdict(list)  # parts of shards not released yet
        self.rows: Counter = Counter()  # samples in those parts, by shard
        self.ends: dict[str, int] = {}  # samples each shard's tar held (its END row)
        self.failures: dict[str, str] = {}
        self.released: set[str] = set()  # shards whose END and samples all came (ready, or failed on the count)
        self.finished: set[str] = set()  # shards whose outputs and record are written
        self._ready: list[tuple[str, list[str]]] = []  # released shards not yet taken, with their parts

    def add(self, row: PartRow) -> bool:
        """Count one row of the part stream; False for a row of a shard already released (nothing new)."""
        shard = row.shard
        if shard in self.released:
            return False
        if row.kind == FAILED:
            self.failures[shard] = row.error
            log.error("embed: shard %s failed: %s", shard, row.error)
            return True
        if row.kind == END:
            self.ends[shard] = row.count
        else:
            self.parts[shard].append(row.part)
            self.rows[shard] += row.rows
        if shard not in self.failures and self.ends.get(shard) == self.rows[shard]:
            self._release(shard)
        return True

    def _release(self, shard: str) -> None:
        self.released.add(shard)
        info, read = self.infos[shard], self.ends[shard]
        parts = self.parts.pop(shard, [])
        if info.expected is not None and read != info.expected:
            self.failures[shard] = f"tar {info.tar} holds {read} samples, its parquet lists {info.expected}"
            return
        self._ready.append((shard, parts))

    def take_ready(self) -> list[tuple[str, list[str]]]:
        """The shards released since the last call, each with its parts, in the order they became ready."""
        ready, self._ready = self._ready, []
        return ready

    def finish(self, shard: str, error: Optional[str] = None) -> None:
        """How the shard's finish task ended: its outputs and record written, or `error`."""
        if error is None:
            self.finished.add(shard)
        else:
            self.failures[shard] = error
            log.error("embed: shard %s failed: %s", shard, error)

    def ended(self) -> int:
        """Shards written or failed."""
        return len(self.finished | set(self.failures))

    def samples_read(self, shard: str) -> int:
        """The samples the shard's END row said its tar held (0 if none came)."""
        return self.ends.get(shard, 0)

    def close(self) -> dict[str, str]:
        """Fail the shards whose END row or samples did not all come; returns {shard: error} of every failed shard.
        Called once no finish task is left (a shard still being finished would count as lost)."""
        unsettled = self.released - self.finished - set(self.failures) | {shard for shard, _ in self._ready}
        if unsettled:
            raise RuntimeError(f"embed: closing with shards still to finish: {sorted(unsettled)}")
        for shard, info in self.infos.items():
            if shard not in self.finished and shard not in self.failures:
                self.failures[shard] = f"only {self.rows[shard]} of {self.ends.get(shard, '?')} samples of {info.tar} came back"
        return self.failures
