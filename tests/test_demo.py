"""The demo end to end (smaller than `make demo`): every stage, a re-run that skips them all, status that
reconciles, the sample CLI, and generated images that match their prompts far above chance."""

import json
import os

import numpy as np

from jobs.cli import main as dalle2
from jobs.demo import main as demo
from pipeline.shapes import describe

SMALL = ["train_clip.max_steps=150", "train_prior.max_steps=400", "train_decoder.max_steps=300",
         "train_clip.eval_every=150", "train_prior.eval_every=200", "train_decoder.eval_every=150",
         "train_clip.checkpoint_every=150", "train_prior.checkpoint_every=200", "train_decoder.checkpoint_every=150",
         "download.samples_per_shard=250"]


def test_demo_runs_every_stage_and_its_images_match_their_prompts(tmp_path, ray_local, capsys):
    root = str(tmp_path / "demo")
    report = demo(["--root", root, "--images", "1000"] + [x for s in SMALL for x in ("--set", s)])
    assert report["stages"] == {"download": "ran", "train-clip": "ran", "embed": "ran", "reorder": "not wanted",
                                "train-prior": "ran", "train-decoder": "ran"}
    for name in ("samples.png", "samples.npy", "report.json", "report.md"):
        assert os.path.exists(os.path.join(root, name)), name

    # generated images match their prompts: colour and position read off the pixels (chance 1/6 and 1/3)
    match = report["prompt_match"]
    assert match["color_match"] >= 0.6 and match["position_match"] >= 0.6, match
    images = np.load(os.path.join(root, "samples.npy"))
    assert images.shape == (24, 32, 32, 3)
    assert describe(images[0])[0] == "red"  # the first prompt is "a red circle on the left"

    # every URL row is counted in every stage
    status = report["status"]
    assert status["download"]["input_rows"] == 1000 == status["download"]["written"] + status["download"]["failed"]
    assert status["embed"]["rows_in"] == status["download"]["written"] == status["embed"]["written"] + status["embed"]["failed"]
    assert status["train-prior"]["image_similarity"] > status["train-prior"]["unrelated_similarity"] + 0.3

    # the stages are complete: `run` with the run's own config skips them all
    capsys.readouterr()
    assert dalle2(["run", "--config", os.path.join(root, "config.yaml")]) == 0
    outcome = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(outcome.values()) == {"skipped", "not wanted"}

    assert dalle2(["status", "--root", root]) == 0
    table = capsys.readouterr().out
    assert "download" in table and "1000 rows in" in table and "train-decoder" in table

    out, out_npy = tmp_path / "grid.png", tmp_path / "images.npy"
    assert dalle2(["sample", "--root", root, "--prompt", "a blue square on the right", "--n", "3",
                   "--cond-scale", "3", "--out", str(out), "--out-npy", str(out_npy)]) == 0
    sampled = np.load(out_npy)
    assert sampled.shape == (3, 32, 32, 3) and sampled.dtype == np.uint8 and out.exists()
