"""`dalle2 demo --url-list` on a user's own list of another kind of image (digits, not shapes), as a user runs it:
the installed CLI, a list in a temporary folder, images over HTTP on 127.0.0.1, short training through --set. The
run is the user's data: its prompts are its own held-out captions, no shape scores, its rows not lost to filter
settings tuned for the built-in set."""

import csv
import functools
import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFont

from jobs.demo import QuietHandler
from tests.ports import free_port
from tests.runs import QUICK_TRAINING

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
INKS = {"white": (240, 240, 240), "yellow": (240, 220, 40), "cyan": (40, 220, 240), "pink": (240, 120, 200)}
COUNT = 260


def digit_site(folder: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Write `count` 32 px pictures of digits in coloured ink on dark noise; returns (path, caption) rows."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=24)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rows = []
    for i in range(count):
        digit, ink = int(rng.integers(10)), list(INKS)[int(rng.integers(len(INKS)))]
        background = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        image = Image.fromarray(background)
        ImageDraw.Draw(image).text((8 + int(rng.integers(-3, 4)), 2 + int(rng.integers(-3, 4))), str(digit),
                                   fill=INKS[ink], font=font)
        image.save(os.path.join(folder, "img", f"{i}.png"))
        rows.append((f"img/{i}.png", f"the number {WORDS[digit]} written in {ink} ink"))
    return rows


@pytest.fixture(scope="session")
def user_list_demo(tmp_path_factory):
    """One small trained run of `dalle2 demo --url-list` on a digits list (shared by every test of it)."""
    home = tmp_path_factory.mktemp("user-list")
    site = home / "site"
    rows = digit_site(str(site), COUNT)
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(QuietHandler, directory=str(site)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    url_list = home / "my-list" / "digits.csv"
    url_list.parent.mkdir()
    with open(url_list, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows([(f"{base}/{path}", caption) for path, caption in rows])
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [os.path.join(os.path.dirname(sys.executable), "dalle2"), "demo", "--url-list", "my-list/digits.csv",
               "--root", "my-run", "--set", "download.allow_private_network=true", "--set", "tracking.mlflow=true",
               "--set", "tracking.wandb=true"]
    command += [x for setting in QUICK_TRAINING for x in ("--set", setting)]
    try:
        done = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=900)
    finally:
        server.shutdown()
    root = home / "my-run"
    return done, root, rows


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_a_users_list_is_judged_on_its_own_held_out_captions_and_keeps_its_rows(user_list_demo):
    done, root, rows = user_list_demo
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    with open(root / "report.json") as f:
        report = json.load(f)
    with open(root / "config.yaml") as f:
        config = yaml.safe_load(f)
    assert report["data"] == "your list" and report["stages"]["train-decoder"] == "ran"

    # the built-in set's filter settings are not the user's: the filter's defaults, and at least 80% of rows kept
    assert config["filter"]["max_caption_rank"] is None and config["filter"]["duplicate_threshold"] is None
    filtered = report["filter"]
    assert filtered["rows_in"] == report["status"]["download"]["written"] > 0.9 * COUNT
    assert filtered["kept"] >= 0.8 * filtered["rows_in"], filtered

    # the prompts are captions of the run's held-out rows, which no training stage read
    from pipeline.formats.holdout import load_holdout
    from pipeline.loaders.plan import SamplePlan

    holdout = load_holdout(str(root))
    assert 2 <= len(holdout) == int(0.1 * report["status"]["download"]["written"])
    assert report["prompts"] == holdout.distinct_captions()[: len(report["prompts"])] and len(report["prompts"]) == 6
    assert all(prompt.startswith("the number ") for prompt in report["prompts"])
    train = SamplePlan.from_aligned(str(root), filtered=True, part="train")
    trained = {(shard, int(i)) for shard in train.counts for i in train.indices(shard)}
    assert not trained & set(zip(holdout.shards, holdout.indices))

    # no shape scores: the page names the user's captions, the grid shows each beside a real image of it
    assert report["prompt_match"] is None and report["withheld_match"] is None
    page = (root / "report.md").read_text()
    assert "colour" not in page and "shape" not in page.lower()
    assert all(prompt in page for prompt in report["prompts"])
    per_prompt = report["samples_per_prompt"]
    assert np.load(root / "samples.npy").shape == (6 * per_prompt, 32, 32, 3)
    with Image.open(root / "samples.png") as grid:
        assert grid.size[1] > 6 * 96  # six rows of enlarged 32 px cells
    agree = report["text_image_agreement"]
    assert agree["r_precision_chance"] == 1 / agree["r_precision_candidates"] and agree["r_precision_candidates"] >= 10
    # the run's CLIP learned the user's captions (its held-out retrieval well above chance, as the filter measured
    # it); the decoder, after 40 steps, need not draw digits yet: its figures are reported, not asserted
    check = filtered["clip_check"]
    assert check["checked"] and check["retrieval"] > 3 * check["chance"], check


@pytest.mark.slow
def test_every_training_job_of_the_users_run_is_an_mlflow_run_with_its_curves_and_sample_grids(user_list_demo,
                                                                                                 monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs.training.history import read_history

    done, root, _ = user_list_demo
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{root}/mlruns")  # the default store: under the run root
    experiment = client.get_experiment_by_name("my-run")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"clip", "prior", "decoder"} and all(r.info.status == "FINISHED" for r in runs.values())
    for job in ("prior", "decoder"):
        evaluations = [line for line in read_history(str(root), job) if "val_loss" in line]
        logged = client.get_metric_history(runs[job].info.run_id, "val_loss")
        assert [(m.step, m.value) for m in logged] == [(e["step"], pytest.approx(e["val_loss"])) for e in evaluations]
        assert runs[job].data.params["batch_size"] == str(yaml.safe_load((root / "config.yaml").read_text())[
            f"train_{job}"]["batch_size"])
    artifacts = sorted(a.path for a in client.list_artifacts(runs["decoder"].info.run_id, "samples"))
    grids = sorted(os.listdir(root / "train" / "decoder" / "samples"))
    assert artifacts == [f"samples/{name}" for name in grids] and grids
    assert "config.yaml" in [a.path for a in client.list_artifacts(runs["prior"].info.run_id)]
    # and an offline W&B run per job with the same evaluations (`wandb sync` uploads them where there is a network)
    from tests.wandb_records import history

    for job in ("clip", "prior", "decoder"):
        run_id = json.loads((root / "train" / job / "wandb_run.json").read_text())["run_id"]
        [path] = (root / "train" / job / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
        evaluations = [line for line in read_history(str(root), job) if "val_loss" in line]
        logged = [(row["_step"], row["val_loss"]) for row in history(str(path)) if "val_loss" in row]
        assert logged == [(e["step"], pytest.approx(e["val_loss"])) for e in evaluations] and logged
