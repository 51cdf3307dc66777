"""Per-stage ledgers: for every shard, rows in, rows written and rows failed by reason.

    <root>/ledger/{stage}/{shard}.json          the shard's record, written last, after all of its outputs:
                                                its done marker; a re-run skips shards that have one
    <root>/ledger/{stage}/_failed/{shard}.json  a shard that failed every try: its rows and the error;
                                                never a done marker, removed once the shard is done
    <root>/ledger/{stage}_fingerprint.json      what the stage's outputs were made from (input list,
                                                shard size, CLIP); outputs made under another are refused
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

from pipeline.run.layout import RunLayout
from pipeline.run.storage import exists, list_files, list_names, read_json, read_many_json, remove, write_json

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


class StaleRunError(ValueError):
    """A stage's existing outputs were made from other inputs or another model than the config names."""


class StageStopped(RuntimeError):
    """A stage ended in a state the stages after it cannot use (failed shards, no rows, a filter dropping too
    much): the run stops there, with a message naming what and why."""


class Ledger:
    """The records of one stage of one run."""

    def __init__(self, layout: RunLayout, stage: str):
        self.layout, self.stage = layout, stage

    def is_done(self, shard: str) -> bool:
        return exists(self.layout.ledger_record(self.stage, shard))

    def done(self) -> set[str]:
        """The shards with a done record (one listing, whatever the number of shards)."""
        return list_names(self.layout.ledger_dir(self.stage), ".json")

    def record(self, record: ShardRecord) -> None:
        """Mark `record.shard` done (its outputs must all be written before), clearing an earlier failure."""
        write_json(self.layout.ledger_record(self.stage, record.shard), asdict(record))
        remove(self._failure_path(record.shard))

    def records(self) -> list[ShardRecord]:
        """Every shard's record (one listing, the files read concurrently)."""
        found = read_many_json(list_files(self.layout.ledger_dir(self.stage), ".json"))
        return [ShardRecord(**record) for _, record in sorted(found.items())]

    def records_of(self, shards: list[str]) -> dict[str, ShardRecord]:
        """{shard: record} of those of `shards` that have one, read concurrently."""
        done = self.done()
        urls = {self.layout.ledger_record(self.stage, s): s for s in shards if s in done}
        return {urls[url]: ShardRecord(**record) for url, record in read_many_json(list(urls)).items()}

    def _failure_path(self, shard: str) -> str:
        return self.layout.ledger_failure(self.stage, shard)

    def fail(self, shard: str, rows: int, error: str) -> None:
        """Record that `shard` (holding `rows` input rows) failed every try with `error`; a re-run retries it."""
        write_json(self._failure_path(shard), {"shard": shard, "rows": rows, "error": error})

    def clear_failure(self, shard: str) -> None:
        """Forget an earlier failure of a unit that has no done record of its own (a reorder part)."""
        remove(self._failure_path(shard))

    def failures(self) -> dict[str, dict]:
        """{shard: {rows, error}} of shards that failed and are not done since."""
        found = read_many_json(list_files(f"{self.layout.ledger_dir(self.stage)}/_failed", ".json")).values()
        done = self.done() if found else set()
        return {f["shard"]: {"rows": f["rows"], "error": f["error"]} for f in found if f["shard"] not in done}

    def fingerprint_changes(self, fingerprint: dict, defaults: Optional[dict] = None) -> dict:
        """{field: (recorded, now)} where the stage's recorded fingerprint differs ({} if none is recorded). A field
        the record does not have, now at its value in `defaults`, was added to the config since those outputs were
        made: not a change (a run made by an earlier version is continued, not refused)."""
        path = self.layout.ledger_fingerprint(self.stage)
        before = read_json(path) if exists(path) else fingerprint
        added_since = {k for k, v in fingerprint.items() if k not in before and (defaults or {}).get(k, object()) == v}
        return {k: (before.get(k), v) for k, v in fingerprint.items() if before.get(k) != v and k not in added_since}

    def check_fingerprint(self, fingerprint: dict, remedy: str, defaults: Optional[dict] = None) -> None:
        """Refuse to add to outputs made under another fingerprint."""
        changed = self.fingerprint_changes(fingerprint, defaults)
        if changed:
            detail = "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise StaleRunError(f"{self.stage}: this run's outputs were made under other settings ({detail}): {remedy}")

    def keep_fingerprint(self, fingerprint: dict) -> None:
        """Record what the outputs are made from; called before the first output is written, so a first
        try that failed before writing anything (a mistyped model name) leaves nothing to refuse."""
        path = self.layout.ledger_fingerprint(self.stage)
        if not exists(path):
            write_json(path, fingerprint)

    def summarize(self, started: float, extra: dict | None = None) -> dict:
        """Totals over every shard (failed shards' rows counted as failed, by their error), written to
        <root>/ledger/{stage}.json and logged as one line."""
        failures = self.failures()
        summary = summarize(self.records(), failures)
        seconds = time.time() - started
        summary.update(stage=self.stage, seconds=round(seconds, 2),
                       rows_per_s=round(summary["rows_in"] / seconds, 2) if seconds > 0 else None, **(extra or {}))
        write_json(self.layout.ledger_summary(self.stage), summary)
        log.info("%s: %d rows in, %d written, %d failed %s over %d shards in %.1fs (%.1f rows/s)",
                 self.stage, summary["rows_in"], summary["written"], summary["failed"], summary["failed_by_reason"],
                 summary["shards"], seconds, summary["rows_per_s"] or 0)
        return summary


def summarize(records: Iterable[ShardRecord], failures: dict[str, dict] | None = None) -> dict:
    """Totals of shard records and of failed shards ({shard: {rows, error}}): every row is written or failed."""
    records, failures = list(records), failures or {}
    reasons: Counter = Counter()
    for r in records:
        reasons.update(r.failed)
    for failure in failures.values():
        if failure["rows"]:
            reasons[f"{SHARD_FAILED}{short_error(failure['error'])}"] += failure["rows"]
    return {
        "shards": len(records),
        "rows_in": sum(r.rows_in for r in records) + sum(f["rows"] for f in failures.values()),
        "written": sum(r.written for r in records),
        "failed": sum(reasons.values()),
        "failed_by_reason": dict(reasons.most_common()),
        "failed_shards": failures,
        "per_shard": {r.shard: {"rows_in": r.rows_in, "written": r.written, "failed": r.failed} for r in records},
    }


SHARD_FAILED = "shard failed: "  # the reason prefix of rows of shards that failed every try


def short_error(error: str) -> str:
    """An error's first line, without the paths and numbers that make every shard's message unique."""
    import re

    line = error.strip().splitlines()[0] if error.strip() else "unknown"
    line = re.sub(r"(\w+://)?[\w.\-]*/[\w./\-]+", "<path>", line)
    return line[:120]
