"""Print a run's ledger: per stage, rows in, written, failed by reason, failed shards with their errors,
and its training checkpoints. Exits 1 when a stage has failed shards or rows that do not reconcile.

    dalle2 status --root RUN [--json]
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from pipeline.run.layout import DOWNLOAD, EMBED, FILTER, REORDER

DATA_STAGES = (DOWNLOAD, EMBED, REORDER, FILTER)  # the stages with a ledger


def run_status(root: str) -> dict:
    """Per stage: the ledger summary (data stages) or the training summary and latest checkpoint."""
    from pipeline.run.layout import RunLayout, TrainLayout
    from pipeline.run.storage import exists, read_json

    from .checkpoints import latest_checkpoint, training_jobs

    layout, status = RunLayout(root), {}
    for stage in DATA_STAGES:
        if exists(layout.ledger_summary(stage)):
            summary = read_json(layout.ledger_summary(stage))
            status[stage] = {k: summary.get(k) for k in ("shards", "rows_in", "written", "failed", "failed_by_reason",
                                                         "failed_shards", "input_rows", "input_rows_skipped",
                                                         "unplaced_rows_by_reason",
                                                         "seconds", "rows_per_s")}
    for job in training_jobs(root):
        path = TrainLayout(root).summary(job)
        status[f"train-{job.replace('_', '-')}"] = {**read_json(path), "latest_checkpoint": latest_checkpoint(root, job)}
    status["problems"] = reconcile(status)
    return status


def as_failure(failure) -> dict:
    """A failed shard's {rows, error}; summaries written before failure records held the error alone."""
    return failure if isinstance(failure, dict) else {"rows": "?", "error": str(failure)}


def reconcile(status: dict) -> list[str]:
    """What does not add up: failed shards, and rows that are neither written nor failed, within a stage
    and from one stage to the next."""
    problems = []
    for stage in DATA_STAGES:
        info = status.get(stage)
        if not info:
            continue
        for shard, failure in (info.get("failed_shards") or {}).items():
            failure = as_failure(failure)
            problems.append(f"{stage}: shard {shard} failed ({failure['rows']} rows): {failure['error']}")
        if info["rows_in"] != info["written"] + info["failed"]:
            problems.append(f"{stage}: {info['rows_in']} rows in but {info['written']} written and {info['failed']} failed")
    download, embed, reorder = status.get("download"), status.get("embed"), status.get("reorder")
    skipped = sum(((download or {}).get("input_rows_skipped") or {}).values())  # malformed URL-list rows
    if download and download.get("input_rows") is not None and download["input_rows"] != download["rows_in"] + skipped \
            and not download.get("failed_shards"):
        problems.append(f"download: {download['input_rows']} input rows but {download['rows_in']} rows recorded"
                        + (f" and {skipped} skipped as malformed" if skipped else ""))
    if download and embed and embed["shards"] == download["shards"] and embed["rows_in"] != download["written"]:
        problems.append(f"embed: {embed['rows_in']} rows in but download wrote {download['written']}")
    if reorder and not reorder.get("failed_shards") and reorder.get("input_rows") is not None:
        unplaced = sum((reorder.get("unplaced_rows_by_reason") or {}).values())
        if reorder["input_rows"] != reorder["rows_in"] + unplaced:
            problems.append(f"reorder: {reorder['input_rows']} input rows but {reorder['rows_in']} placed and "
                            f"{unplaced} unplaced")
    aligned = reorder or embed
    filtered = status.get("filter")
    if filtered and aligned and not filtered.get("failed_shards") and not aligned.get("failed_shards") \
            and filtered["shards"] == aligned["shards"] and filtered["rows_in"] != aligned["written"]:
        problems.append(f"filter: {filtered['rows_in']} rows in but {'reorder' if reorder else 'embed'} wrote "
                        f"{aligned['written']}")
    return problems


def main(argv: Optional[list[str]] = None) -> dict:
    """Print the status of the run at --root."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the run's root (local path or fsspec URL)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    status = run_status(args.root)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return status
    if not status:
        print(f"{args.root}: no stage has run yet")
    for stage, info in status.items():
        if stage == "problems":
            continue
        if "rows_in" in info:
            reasons = ", ".join(f"{n} {r}" for r, n in (info.get("failed_by_reason") or {}).items()) or "none"
            written, failed = ("kept", "dropped") if stage == "filter" else ("written", "failed")
            line = f"{stage:<14} {info['shards']} shards, {info['rows_in']} rows in, {info['written']} {written}, " \
                   f"{info['failed']} {failed} ({reasons})"
            if info.get("input_rows") is not None:
                line += f"; {info['input_rows']} input rows"
            if info.get("input_rows_skipped"):
                line += f" ({', '.join(f'{n} {r}' for r, n in info['input_rows_skipped'].items())}, skipped)"
            if info.get("failed_shards"):
                line += f"; {len(info['failed_shards'])} FAILED SHARDS"
                for shard, failure in sorted(info["failed_shards"].items()):
                    failure = as_failure(failure)
                    line += f"\n{'':<14} {shard}: {failure['rows']} rows, {failure['error']}"
        elif info.get("imported_from"):  # dalle2 import: weights trained elsewhere
            line = f"{stage:<14} imported from {info['imported_from']}, checkpoint {info.get('latest_checkpoint')}"
        else:
            line = f"{stage:<14} step {info.get('step')}, loss {info.get('loss', float('nan')):.4f}, " \
                   f"checkpoint {info.get('latest_checkpoint')}"
        print(line)
    for problem in status["problems"]:
        print(f"PROBLEM: {problem}")
    return status


if __name__ == "__main__":
    main()
