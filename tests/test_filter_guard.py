"""The filter's CLIP rules judge only a run whose CLIP retrieves its held-out captions; past a share of the rows
they stop the stage naming each rule; a training job short of rows says which stage took them, before it starts."""

from collections import Counter

import numpy as np
import pytest

from pipeline.execution.session import RaySession
from pipeline.formats.aligned import align, write_aligned
from pipeline.run.config import FilterConfig, HoldoutConfig
from pipeline.stages.filter.rules import low_rank, low_similarity
from pipeline.stages.filter.stage import run_filter
from pipeline.stages.filter.guard import check_model_drops
from pipeline.stages.holdout import ensure_holdout
from pipeline.run.layout import RunLayout
from pipeline.run.ledger import StageStopped, StaleRunError
from pipeline.run.storage import exists, list_files, read_json

DIM, PER_SHARD, SHARDS = 32, 50, 4


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def aligned_run(root: str, caption_noise: float, seed: int = 0, kinds: int = 20) -> None:
    """Aligned shards of images of `kinds` kinds, each captioned by its kind; text embeddings are the image's kind plus
    `caption_noise` (0.2: a CLIP that knows its captions; 5: one that guesses)."""
    rng = np.random.default_rng(seed)
    kinds = unit(rng.standard_normal((kinds, DIM)))
    for shard_id in range(SHARDS):
        kind = rng.integers(0, len(kinds), PER_SHARD)
        image = unit(kinds[kind] + 0.1 * rng.standard_normal((PER_SHARD, DIM)))
        text = unit(kinds[kind] + caption_noise * rng.standard_normal((PER_SHARD, DIM)))
        captions = [f"a picture of kind {k}" for k in kind]
        aligned = align(shard_id, PER_SHARD, 5, 2, np.arange(PER_SHARD), image.astype(np.float16),
                        text.astype(np.float16), captions)
        write_aligned(RunLayout(root), f"{shard_id:05d}", aligned)


def test_the_stop_message_names_each_model_rule_its_share_and_what_to_set():
    config = FilterConfig(max_caption_rank=1, min_similarity=0.3, max_clip_drop=0.2)
    dropped = Counter({low_rank(1): 150, low_similarity(0.3): 30})
    with pytest.raises(StageStopped) as stopped:
        check_model_drops(config, 400, dropped)
    assert str(stopped.value) == (
        "filter: the rules that judge with a model would drop 180 of 400 rows (45%), more than filter.max_clip_drop "
        "20%: 'caption not in the image's top 1' 150 (38%), 'clip similarity below 0.3' 30 (8%). Settings tuned on "
        "other data drop good rows here: loosen or unset filter.min_similarity / filter.max_caption_rank / "
        "filter.language_model, or set filter.on_large_clip_drop=continue to drop them anyway")
    check_model_drops(config, 400, Counter({low_rank(1): 80}))  # 20%: not more than the share
    check_model_drops(config.model_copy(update={"on_large_clip_drop": "continue"}), 400, dropped)  # told to go on
    with pytest.raises(StageStopped, match="more than filter.max_clip_drop 10%"):
        check_model_drops(config.model_copy(update={"max_clip_drop": 0.1}), 400, Counter({low_rank(1): 41}))


def test_a_clip_that_guesses_is_not_trusted_its_rules_are_skipped_and_the_summary_says_why(tmp_path):
    root = str(tmp_path / "run")
    aligned_run(root, caption_noise=5.0)
    holdout = ensure_holdout(root, HoldoutConfig(rows=40))
    config = FilterConfig(max_caption_rank=1, distributor="local")
    summary = run_filter(config, root, RaySession(), holdout=holdout)
    check = summary["clip_check"]
    assert check["checked"] and not check["trusted"] and check["skipped"] and check["retrieval"] < 0.5
    assert check["rules"] == [low_rank(1)] and "would drop good rows" in check["why"]
    # the rank rule is judged at its own rank: within the first k of k captions, every caption is found
    from pipeline.stages.filter.guard import held_out_retrieval

    assert held_out_retrieval(root, holdout, rank=check["captions"])["retrieval_at_rank"] == 1.0
    assert check["retrieval_at_rank"] == check["retrieval"] < 0.5
    assert summary["written"] == summary["rows_in"] == SHARDS * PER_SHARD  # no row dropped on a guess
    from jobs.report import clip_check_html  # the run's page (report.html) says why

    page = clip_check_html(RunLayout(root))
    assert f"among {check['captions']} held-out captions {check['retrieval']:.0%} of the time" in page
    assert "caption not in the image&#x27;s top 1 skipped: no row was dropped on its judgement" in page

    # told to apply them anyway, they would drop most rows: the stage stops, names the rule, and records nothing
    again = str(tmp_path / "again")
    aligned_run(again, caption_noise=5.0)
    holdout = ensure_holdout(again, HoldoutConfig(rows=40))
    applied = config.model_copy(update={"on_untrusted_clip": "apply"})
    with pytest.raises(StageStopped, match=r"would drop \d+ of 200 rows \(\d+%\), more than filter.max_clip_drop 20%: "
                                           r"'caption not in the image's top 1'"):
        run_filter(applied, again, RaySession(), holdout=holdout)
    layout = RunLayout(again)
    assert not list_files(layout.filter, ".parquet") and not exists(layout.ledger_fingerprint("filter"))
    assert not list_files(layout.ledger_dir("filter"), ".json")
    # the next try goes on under the settings it is given (here: told to drop them), nothing refused as stale
    summary = run_filter(applied.model_copy(update={"on_large_clip_drop": "continue"}), again, RaySession(), holdout=holdout)
    dropped = summary["failed_by_reason"][low_rank(1)]
    assert dropped > 0.2 * 200 and summary["written"] + dropped == summary["rows_in"] == 200


def test_a_clip_that_knows_its_captions_is_trusted_and_its_rules_drop_the_wrong_ones(tmp_path):
    root = str(tmp_path / "run")
    aligned_run(root, caption_noise=0.2)
    holdout = ensure_holdout(root, HoldoutConfig(rows=40))
    summary = run_filter(FilterConfig(max_caption_rank=1, distributor="local"), root, RaySession(), holdout=holdout)
    # a run filtered by an earlier version recorded no guard settings: continued, not refused as made otherwise
    from pipeline.stages.filter.stage import fingerprint
    from pipeline.run.storage import write_json

    earlier = {k: v for k, v in fingerprint(FilterConfig(max_caption_rank=1)).items()
               if k not in ("min_clip_retrieval", "on_untrusted_clip")}
    write_json(RunLayout(root).ledger_fingerprint("filter"), earlier)
    assert run_filter(FilterConfig(max_caption_rank=1, distributor="local"), root, RaySession(), holdout=holdout)["written"] == \
        summary["written"]
    with pytest.raises(StaleRunError, match="max_caption_rank was 1, now 2"):  # a recorded field still counts
        run_filter(FilterConfig(max_caption_rank=2, distributor="local"), root, RaySession(), holdout=holdout)
    with pytest.raises(StaleRunError, match="on_untrusted_clip was None, now 'apply'"):  # and a new one set otherwise
        run_filter(FilterConfig(max_caption_rank=1, on_untrusted_clip="apply", distributor="local"), root, RaySession(), holdout=holdout)
    check = summary["clip_check"]
    assert check["trusted"] and not check["skipped"] and check["retrieval"] >= 0.9 and check["captions"] <= 20
    assert check["chance"] == pytest.approx(1 / check["captions"], abs=1e-4)
    assert summary["failed"] <= 0.2 * summary["rows_in"]  # the rule ran and kept the stage under its share
    assert read_json(RunLayout(root).ledger_summary("filter"))["clip_check"] == check


def test_a_training_job_short_of_rows_says_how_many_each_stage_left_before_it_starts(tmp_path, caplog):
    from jobs.run_config import RunConfig
    from jobs.training.rows import TooFewRows, check_enough_rows
    from tests.runs import make_training_run

    root = str(tmp_path / "run")
    make_training_run(root, count=60, per_shard=20, size=32, dim=8, filter_config=None)
    config = RunConfig(root=root, filter={"distributor": "local", "max_caption_chars": 25, "max_clip_drop": 1.0})
    ensure_holdout(root, config.holdout)
    run_filter(config.filter, root, RaySession())
    summary = read_json(RunLayout(root).ledger_summary("filter"))
    long_captions = summary["failed_by_reason"]["caption too long"]
    assert 0 < long_captions < 60
    kept_for_training = summary["written"] - sum(1 for c in ensure_holdout(root, config.holdout).captions if len(c) <= 25)
    short = config.model_copy(update={"train_prior": config.train_prior.model_copy(update={"batch_size": 64})})
    with pytest.raises(TooFewRows) as stopped:
        check_enough_rows(short, "train_prior")
    message = str(stopped.value)
    assert message.startswith(f"train_prior: {kept_for_training} rows to train on, fewer than one batch "
                              "(train_prior.batch_size 64; 2 workers take 128 a step). Rows left at each stage: "
                              "holdout kept 6 for evaluation")
    assert f"filter kept {summary['written']} of 60; caption too long: {long_captions}" in message
    assert "Lower train_prior.batch_size, loosen the filter or give the run more rows." in message

    def with_batch(size):
        return config.model_copy(update={"train_prior": config.train_prior.model_copy(update={"batch_size": size})})

    # a batch that fits once but not on both workers: it trains, and says its batches repeat rows
    check_enough_rows(with_batch(kept_for_training - 1), "train_prior")
    assert f"train_prior: {kept_for_training} rows to train on, fewer than the {2 * (kept_for_training - 1)} a step" \
        in caplog.text
    caplog.clear()
    check_enough_rows(with_batch(kept_for_training // 2), "train_prior")  # 2 workers x a batch that fits: no complaint
    assert "rows to train on" not in caplog.text


def test_each_clip_rule_is_judged_by_the_retrieval_it_needs(tmp_path):
    # a CLIP that tells a right caption from 9 wrong ones (89%) but finds it among 77 held-out captions 68% of the
    # time: good enough for a similarity threshold, not for a caption-rank rule (which drops a right row whenever
    # the caption is not first among the shard's)
    root = str(tmp_path / "run")
    aligned_run(root, caption_noise=0.3, kinds=150)
    holdout = ensure_holdout(root, HoldoutConfig(rows=100, max_fraction=0.5))
    config = FilterConfig(max_caption_rank=1, min_similarity=0.9, on_large_clip_drop="continue", distributor="local")
    summary = run_filter(config, root, RaySession(), holdout=holdout)
    check = summary["clip_check"]
    assert check["retrieval"] < 0.8 <= check["retrieval_of_10"] and check["chance_of_10"] == 0.1
    assert check["rules"] == [low_rank(1), low_similarity(0.9)] and check["skipped_rules"] == [low_rank(1)]
    assert low_rank(1) not in summary["failed_by_reason"] and summary["failed_by_reason"][low_similarity(0.9)] > 0
    assert f"'{low_rank(1)}' would drop good rows" in check["why"] and "similarity" not in check["why"]
