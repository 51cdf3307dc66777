"""Per-stage ledgers: for every shard, rows in, rows written and rows failed by reason.

A shard's record is written last, after all of its outputs, so it doubles as the shard's done
marker: a re-run skips shards that have one and redoes the others.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

from .layout import RunLayout
from .storage import exists, list_files, read_json, write_json

log = logging.getLogger(__name__)


@dataclass
class ShardRecord:
    """What one stage did with one shard. rows_in == written + sum(failed.values())."""

    shard: str
    rows_in: int
    written: int
    failed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        lost = self.rows_in - self.written - sum(self.failed.values())
        if lost:
            raise ValueError(f"shard {self.shard}: {self.rows_in} rows in but {self.written} written and "
                             f"{sum(self.failed.values())} failed ({lost} unaccounted)")

    @classmethod
    def whole_shard_failed(cls, shard: str, rows_in: int, reason: str) -> "ShardRecord":
        """Every row of a shard failed for one reason (e.g. an unreadable tar)."""
        return cls(shard, rows_in, 0, {reason: rows_in} if rows_in else {})


class Ledger:
    """The records of one stage of one run."""

    def __init__(self, layout: RunLayout, stage: str):
        self.layout, self.stage = layout, stage

    def is_done(self, shard: str) -> bool:
        return exists(self.layout.ledger_record(self.stage, shard))

    def record(self, record: ShardRecord) -> None:
        write_json(self.layout.ledger_record(self.stage, record.shard), asdict(record))

    def records(self) -> list[ShardRecord]:
        return [ShardRecord(**read_json(url)) for url in list_files(self.layout.ledger_dir(self.stage), ".json")]

    def summarize(self, started: float, extra: dict | None = None) -> dict:
        """Totals over every shard, written to <root>/ledger/{stage}.json and logged as one line."""
        summary = summarize(self.records())
        seconds = time.time() - started
        summary.update(stage=self.stage, seconds=round(seconds, 2),
                       rows_per_s=round(summary["rows_in"] / seconds, 2) if seconds > 0 else None, **(extra or {}))
        write_json(self.layout.ledger_summary(self.stage), summary)
        log.info("%s: %d rows in, %d written, %d failed %s over %d shards in %.1fs (%.1f rows/s)",
                 self.stage, summary["rows_in"], summary["written"], summary["failed"], summary["failed_by_reason"],
                 summary["shards"], seconds, summary["rows_per_s"] or 0)
        return summary


def summarize(records: Iterable[ShardRecord]) -> dict:
    """Totals of a list of shard records."""
    records = list(records)
    reasons: Counter = Counter()
    for r in records:
        reasons.update(r.failed)
    return {
        "shards": len(records),
        "rows_in": sum(r.rows_in for r in records),
        "written": sum(r.written for r in records),
        "failed": sum(reasons.values()),
        "failed_by_reason": dict(reasons.most_common()),
        "per_shard": {r.shard: {"rows_in": r.rows_in, "written": r.written, "failed": r.failed} for r in records},
    }
