"""The run's held-out rows: drawn once before training, left out of every training plan, read by every evaluation."""

import pytest

from pipeline.run.config import HoldoutConfig
from pipeline.formats.holdout import load_holdout
from pipeline.stages.holdout import ensure_holdout
from pipeline.run.ledger import StaleRunError
from pipeline.loaders.plan import SamplePlan
from tests.runs import make_training_run


@pytest.fixture()
def run_root(tmp_path):
    root = str(tmp_path / "run")
    make_training_run(root, count=200, per_shard=16, size=32, dim=8)
    return root


def rows_of(plan: SamplePlan) -> set[tuple[str, int]]:
    return {(shard, int(i)) for shard in plan.counts for i in plan.indices(shard)}


def test_held_out_rows_are_in_no_training_plan_and_every_row_is_in_exactly_one_part(run_root):
    holdout = ensure_holdout(run_root, HoldoutConfig(rows=500, max_fraction=0.1, max_shards=3))
    assert len(holdout) == 20  # 10% of 200 (rows: 500 is the larger bound here)
    assert len(set(holdout.shards)) <= 3  # planning reads the row lists of these shards alone
    held = {(s, i) for s, i in zip(holdout.shards, holdout.indices)}
    assert len(held) == 20
    for plan_of in (lambda part: SamplePlan.from_aligned(run_root, part=part),
                    lambda part: SamplePlan.from_aligned(run_root, filtered=True, part=part),
                    lambda part: SamplePlan.from_shards(run_root, part=part)):
        every, train, held_out = plan_of("all"), plan_of("train"), plan_of("held_out")
        assert rows_of(held_out) == held and not rows_of(train) & held
        assert rows_of(train) | held == rows_of(every) and train.size + held_out.size == every.size == 200
        # the loaders draw what the plan counts: an epoch of the training plan never yields a held-out caption's row
        runs, padded = train.rank_slice(0, 1, epoch=0, seed=0)
        assert padded == 0 and not {(s, int(i)) for s, rows in runs for i in rows} & held
    head = SamplePlan.from_aligned(run_root, part="held_out").head(7)
    assert head.size == 7 and rows_of(head) <= held
    # the captions written with the split are the rows' own
    from pipeline.formats.aligned import read_aligned
    from pipeline.run.layout import RunLayout

    for shard, index, caption in zip(holdout.shards, holdout.indices, holdout.captions):
        assert read_aligned(RunLayout(run_root), shard).captions[index] == caption


def test_the_split_is_fixed_once_and_another_config_is_refused_naming_the_field(run_root):
    config = HoldoutConfig(rows=8)
    first = ensure_holdout(run_root, config)
    assert len(first) == 8 and ensure_holdout(run_root, config) == first == load_holdout(run_root)
    with pytest.raises(StaleRunError, match=r"holdout\.rows=8 but the config says rows=9: set them back .* new root"):
        ensure_holdout(run_root, HoldoutConfig(rows=9))
    # another seed draws other rows (the draw is random, not the first rows of the list, which may be sorted)
    other = str(run_root) + "-copy"
    import shutil

    shutil.copytree(run_root, other)
    (__import__("os")).remove(f"{other}/holdout.parquet")
    again = ensure_holdout(other, HoldoutConfig(rows=8, seed=1))
    assert set(zip(again.shards, again.indices)) != set(zip(first.shards, first.indices))
    assert len(set(first.shards)) > 1  # drawn over the list, not its first rows


def test_the_training_jobs_plan_without_the_held_out_rows_and_evaluate_on_them(run_root, caplog):
    from jobs.run_config import RunConfig
    from jobs.training.rows import training_plans

    run = RunConfig(root=run_root, holdout={"rows": 12})
    held = set(zip(*(lambda h: (h.shards, h.indices))(ensure_holdout(run_root, run.holdout))))
    for section in ("train_clip", "train_prior", "train_decoder"):
        train, evaluation = training_plans(run, section)
        assert not rows_of(train) & held and rows_of(evaluation) <= held, section
        assert train.size == 200 - 12 and evaluation.size == min(12, getattr(run, section).eval_size), section
    # a split drawn after training ran (a run from before splits) says so
    import os

    os.remove(f"{run_root}/holdout.parquet")
    ensure_holdout(run_root, run.holdout, trained=("clip", "prior"))
    assert "holdout: drawn after clip, prior trained on every row" in caplog.text


def test_no_rows_held_out_when_asked_for_none(run_root):
    assert len(ensure_holdout(run_root, HoldoutConfig(rows=0))) == 0
    assert SamplePlan.from_aligned(run_root, part="train").size == 200
