"""Which rows a training job reads, and whether they are enough: checked in the driver before any worker starts."""

from __future__ import annotations

import logging

from pipeline.run.ledger import StageStopped

log = logging.getLogger(__name__)


def training_plans(run, section: str):
    """(train plan, evaluation plan) of a training job: the run's rows without its held-out ones (pipeline/formats/holdout.py),
    filtered for the prior and the decoder; the held-out rows, up to `eval_size`, whatever the filter said of them (its
    verdicts shape training, not the test set). CLIP reads the downloaded shards, the others the aligned embeddings."""
    from pipeline.loaders.plan import SamplePlan

    job = getattr(run, section)
    if section == "train_clip":
        return (SamplePlan.from_shards(run.root, part="train"),
                SamplePlan.from_shards(run.root, part="held_out").head(job.eval_size))
    return (SamplePlan.from_aligned(run.root, filtered=run.filter.enabled, part="train"),
            SamplePlan.from_aligned(run.root, part="held_out").head(job.eval_size))


def planned_steps(job, loader, parts: int = 1) -> int:
    """The optimizer steps each trained part takes in this job (what a decaying learning rate spans)."""
    from dalle2.lr_schedules import planned_optimizer_steps

    return planned_optimizer_steps(batches_per_epoch=loader.batches_per_epoch(), epochs=job.epochs,
                                   max_steps=job.max_steps, grad_accum_every=job.trainer.grad_accum_every, parts=parts)


class TooFewRows(StageStopped):
    """A training job's rows cannot fill one batch."""


def check_enough_rows(config, section: str) -> None:
    """Refuse, before any worker starts, a job whose training rows cannot fill one batch, saying how many rows each
    stage left and which filter rules took them; warn when the workers' batches repeat rows to fill a step."""
    job = getattr(config, section)
    train, held_out = training_plans(config, section)
    rows, per_step = train.size, job.workers * job.batch_size
    if rows < job.batch_size:
        raise TooFewRows(f"{section}: {rows} rows to train on, fewer than one batch ({section}.batch_size "
                         f"{job.batch_size}; {job.workers} workers take {per_step} a step). {rows_left(config, section)}. "
                         f"Lower {section}.batch_size{'' if section == 'train_clip' else ', loosen the filter'} or "
                         "give the run more rows.")
    if rows < per_step:
        log.warning("%s: %d rows to train on, fewer than the %d a step takes (%d workers x batch_size %d): batches "
                    "repeat rows. %s", section, rows, per_step, job.workers, job.batch_size, rows_left(config, section))
    if not held_out.size:
        log.warning("%s: no held-out rows to evaluate on (holdout.rows is 0, or those rows have no embeddings): "
                    "training runs without evaluations", section)


def rows_left(config, section: str) -> str:
    """'Rows left at each stage: ...' from the stages' ledger summaries and the holdout."""
    from pipeline.formats.holdout import load_holdout
    from pipeline.run.layout import RunLayout
    from pipeline.run.storage import exists, read_json

    layout = RunLayout(config.root)

    def summary(stage: str) -> dict:
        return read_json(layout.ledger_summary(stage)) if exists(layout.ledger_summary(stage)) else {}

    def dropped(found: dict) -> str:
        reasons = sorted((found.get("failed_by_reason") or {}).items(), key=lambda item: -item[1])
        return "".join(f"; {reason}: {count}" for reason, count in reasons[:4])

    parts = []
    download = summary("download")
    if download:
        parts.append(f"download wrote {download['written']} of {download['rows_in']}{dropped(download)}")
    parts.append(f"holdout kept {len(load_holdout(config.root))} for evaluation (holdout.rows, holdout.max_fraction)")
    filtered = summary("filter")
    if section != "train_clip" and config.filter.enabled and filtered:
        parts.append(f"filter kept {filtered['written']} of {filtered['rows_in']}{dropped(filtered)}")
    return "Rows left at each stage: " + "; then ".join(parts)
