"""The command's Ray session (pipeline/execution/session.py): a stage called without one is refused, never given a
default Ray behind the caller's back."""

from __future__ import annotations

import pytest

from pipeline.execution.distributor import run_shards
from pipeline.execution.session import RaySession, require_session
from pipeline.run.config import DownloadConfig, EmbedConfig, FilterConfig, ReorderConfig
from pipeline.stages.download.stage import run_download
from pipeline.stages.embed.stage import run_embed
from pipeline.stages.filter.stage import run_filter
from pipeline.stages.reorder import run_reorder


@pytest.mark.parametrize("stage, config", [(run_download, DownloadConfig(url_list="urls.csv")), (run_embed, EmbedConfig()),
                                           (run_reorder, ReorderConfig(source="clip-retrieval")), (run_filter, FilterConfig())])
def test_a_stage_called_without_a_session_is_refused_naming_it(stage, config, tmp_path):
    with pytest.raises(TypeError, match=rf"{stage.__name__} needs the command's RaySession"):
        stage(config, str(tmp_path / "run"), None)
    assert not (tmp_path / "run").exists()  # refused before any work: no Ray asked for, no file of the run written


def test_a_training_stage_called_without_a_session_is_refused_before_it_draws_the_held_out_rows(tmp_path):
    from jobs.run_config import RunConfig
    from jobs.train_prior import prior_loop
    from jobs.training.driver import train

    config = RunConfig(root=str(tmp_path / "run"))
    with pytest.raises(TypeError, match="train_prior: train needs the command's RaySession"):
        train(config, None, prior_loop, "train_prior")
    assert not (tmp_path / "run").exists()  # no holdout.parquet drawn, no Ray asked for


def test_run_shards_needs_the_session_even_to_run_locally():
    with pytest.raises(TypeError, match="shards: run_shards needs the command's RaySession"):
        run_shards(lambda shard: None, ["00000"], session="ray", distributor="local")
    assert require_session(RaySession(), "a stage").embedded is False  # a session starts nothing until used
