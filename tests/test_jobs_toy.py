"""The toy prior job and the config loader it shares with every job."""

import pytest

from jobs.cli import main as cli_main
from jobs.config_io import ConfigError, load_config
from jobs.toy_prior import ToyPriorJob, main


def test_toy_prior_job_runs_and_saves(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("steps: 4\neval_every: 2\nbatch_size: 16\neval_size: 8\ntrainer:\n  lr: 0.001\n")
    metrics = main(["--config", str(config), "--set", f"checkpoint={tmp_path / 'prior'}"])
    assert metrics["step"] == 4 and set(metrics) >= {"image_similarity", "unrelated_similarity", "loss"}
    assert (tmp_path / "prior" / "model.safetensors").exists() and (tmp_path / "prior" / "state.pt").exists()


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="trainer.amp"):
        load_config(ToyPriorJob, None, ["trainer.amp=fp8"])
    with pytest.raises(ConfigError, match="stepz"):
        load_config(ToyPriorJob, None, ["stepz=3"])
    assert load_config(ToyPriorJob, None, ["trainer.lr=0.5", "steps=7"]).trainer.lr == 0.5


def test_cli_rejects_unknown_commands(capsys):
    assert cli_main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli_main([]) == 0 and "toy-prior" in capsys.readouterr().out
