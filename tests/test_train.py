"""Training jobs on Ray Train with 2 CPU workers: checkpoints, resume, a checkpoint killed or torn, s3 storage."""

import json
import os

import numpy as np
import pytest
import yaml

from dalle2.checkpoint import COMPLETE_FILE, STATE_FILE, incomplete_reason
from jobs import train_prior
from jobs.checkpoints import latest_checkpoint
from jobs.training.history import read_history
from pipeline.run.layout import TrainLayout
from tests.runs import make_training_run


def run_config(root, **prior):
    fields = dict(workers=2, batch_size=16, eval_size=16, eval_every=10, checkpoint_every=10, max_steps=30,
                  epochs=20, keep_checkpoints=2, trainer={"lr": 1e-3, "warmup_steps": 5})
    fields.update(prior)
    return {"root": root, "train_prior": fields}


def write_config(tmp_path, config):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def training_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train") / "run")
    make_training_run(root, count=96, per_shard=32, size=32, dim=64)
    return root


@pytest.mark.slow
def test_train_prior_checkpoints_on_s3_and_resumes_from_there(training_root, tmp_path, s3_server, ray_local):
    # on S3 (moto's server): local roots train in the fault matrix, the torn-checkpoint test and the demo
    import fsspec

    from pipeline.run.storage import list_files

    root = s3_server() + "/run"
    fs = fsspec.filesystem("s3")
    fs.put(training_root + "/", root.replace("s3://", "") + "/", recursive=True)
    summary = train_prior.main(["--config", write_config(tmp_path, run_config(root))])
    assert summary["step"] == 30 and summary["resumed_from_step"] == 0
    assert summary["image_similarity"] > summary["unrelated_similarity"]
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in list_files(f"{TrainLayout(root).storage}/prior")]
    checkpoints = sorted(n for n in names if n.startswith("checkpoint_") and not n.endswith(".json"))
    assert len(checkpoints) == 2  # keeps the last K
    checkpoint = latest_checkpoint(root, "prior")
    assert checkpoint.startswith("s3://") and checkpoint.endswith(checkpoints[-1])
    assert fs.exists(checkpoint.replace("s3://", "") + "/model.safetensors")
    for name in checkpoints:  # Ray persisted each through our upload: the COMPLETE marker last, matching the files
        assert incomplete_reason(f"{TrainLayout(root).storage}/prior/{name}") is None, name

    # a re-run with a higher step budget continues from step 30, not from zero
    more = train_prior.main(["--config", write_config(tmp_path, run_config(root, max_steps=40))])
    assert more["step"] == 40 and more["resumed_from_step"] == 30

    # the curves the report draws: the loss at every logged step and each evaluation, across the resume
    history = read_history(root, "prior")
    losses = [line["step"] for line in history if "loss" in line and "image_similarity" not in line]
    evaluations = [line["step"] for line in history if "image_similarity" in line]
    assert losses == [20, 30, 40] and evaluations == [10, 20, 30, 40]  # log_every 20 and the last step; eval_every 10
    assert all(np.isfinite(line["loss"]) for line in history if "loss" in line)

    # TensorBoard's events on S3 too, one file per run (the first and the resumed one), every evaluation in them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list_files(TrainLayout(root).tensorboard("prior"))
    assert len(events) == 2 and all("tfevents" in e for e in events), events
    steps = []
    for event in events:
        local = tmp_path / event.rsplit("/", 1)[-1]
        fs.get(event.replace("s3://", ""), str(local))
        steps += [e.step for e in EventAccumulator(str(local)).Reload().Scalars("image_similarity")]
    assert sorted(steps) == [10, 20, 30, 40]


def complete_checkpoints(root) -> dict[int, str]:
    """{step: folder} of the prior's checkpoints that have their COMPLETE marker."""
    folder = os.path.join(TrainLayout(root).storage, "prior")
    out = {}
    for name in os.listdir(folder):
        marker = os.path.join(folder, name, COMPLETE_FILE)
        if name.startswith("checkpoint_") and os.path.exists(marker):
            out[json.load(open(marker))["step"]] = os.path.join(folder, name)
    return out


@pytest.mark.slow
def test_a_checkpoint_killed_before_its_marker_or_torn_after_it_is_passed_over_for_the_one_before(training_root,
                                                                                                   tmp_path, ray_local):
    import shutil

    from tests.test_faults import dalle2

    root = str(tmp_path / "run")
    shutil.copytree(training_root, root)
    config = run_config(root, max_steps=9, checkpoint_every=3, eval_every=3, keep_checkpoints=5, max_failures=0)
    first = dalle2("train-prior", config, tmp_path, crash="train.before_marker@2")
    assert first.returncode != 0  # the worker died persisting its step-6 checkpoint, before the marker
    folder = os.path.join(TrainLayout(root).storage, "prior")
    torn = [n for n in os.listdir(folder) if n.startswith("checkpoint_") and os.path.isdir(f"{folder}/{n}")
            and not os.path.exists(f"{folder}/{n}/{COMPLETE_FILE}")]
    assert len(torn) == 1 and os.path.exists(f"{folder}/{torn[0]}/{STATE_FILE}"), os.listdir(folder)
    assert latest_checkpoint(root, "prior") == complete_checkpoints(root)[3]
    # the re-runs on the session's Ray (only the crash needs a process of its own)
    summary = train_prior.main(["--config", write_config(tmp_path, config)])
    assert summary["step"] == 9 and summary["resumed_from_step"] == 3
    checkpoints = complete_checkpoints(root)
    assert sorted(checkpoints) == [3, 6, 9]

    # a power loss after Ray registered step 9: its marker never reached the disk and state.pt is half there
    os.remove(os.path.join(checkpoints[9], COMPLETE_FILE))
    with open(os.path.join(checkpoints[9], STATE_FILE), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    assert latest_checkpoint(root, "prior") == checkpoints[6]
    longer = {**config, "train_prior": {**config["train_prior"], "max_steps": 12}}
    summary = train_prior.main(["--config", write_config(tmp_path, longer)])
    assert summary["step"] == 12 and summary["resumed_from_step"] == 6  # Ray offered step 9; the run took step 6


@pytest.mark.slow
def test_accumulation_checkpoints_once_per_step_keeps_every_evaluation_and_the_best_and_decays_the_lr(
        training_root, tmp_path, ray_local):
    import shutil

    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs.training.best import read_best

    root = str(tmp_path / "run")
    shutil.copytree(training_root, root)
    # the learning rate from 3e-3 down to 3e-4 at the job's 6th optimizer step; the best by val_loss kept too
    config = run_config(root, workers=2, max_steps=6, eval_every=2, checkpoint_every=3, keep_checkpoints=10,
                        keep_best=True, trainer={"lr": 3e-3, "grad_accum_every": 2, "lr_schedule": "linear",
                                                 "min_lr": 3e-4})
    summary = train_prior.main(["--config", write_config(tmp_path, config)])
    assert summary["step"] == 6 and summary["eval_step"] == 6 and "image_similarity" in summary
    evaluations = [(line["step"], line["val_loss"]) for line in read_history(root, "prior") if "val_loss" in line]
    assert [step for step, _ in evaluations] == [2, 4, 6] and len({loss for _, loss in evaluations}) == 3
    step, loss = min(evaluations, key=lambda evaluation: evaluation[1])
    best = read_best(root, "prior")
    assert best["step"] == step and best["val_loss"] == pytest.approx(loss) and f"/step_{step}_" in best["checkpoint"]
    assert incomplete_reason(best["checkpoint"]) is None
    # those it beat: gone
    assert os.listdir(os.path.join(TrainLayout(root).job("prior"), "best")) == [best["checkpoint"].rsplit("/", 1)[-1]]
    state = torch.load(os.path.join(latest_checkpoint(root, "prior"), STATE_FILE), weights_only=True)
    assert state["optimizers"][0]["param_groups"][0]["lr"] == pytest.approx(3e-4)  # the floor, at the planned step 6
    folder = os.path.join(TrainLayout(root).storage, "prior")
    checkpoints = [p for p in os.listdir(folder) if p.startswith("checkpoint_") and not p.endswith(".json")]
    # one per optimizer step 3 and 6: none at step 0, none twice while accumulating
    assert len(checkpoints) == 2, checkpoints
    events = EventAccumulator(os.path.join(folder, "tensorboard")).Reload()
    # every evaluation reached the logs, not only those on checkpoint steps
    assert [e.step for e in events.Scalars("image_similarity")] == [2, 4, 6]


def test_ray_trains_preemption_watcher_is_left_out_only_on_a_ray_this_process_started(monkeypatch):
    import os

    from pipeline.execution.session import PREEMPTION_WATCHER as name, RaySession

    monkeypatch.delenv(name, raising=False)
    local = RaySession(embedded=True)
    with local.preemption_watcher_off():
        assert os.environ[name] == "0"  # read by Ray Train when fit() starts its controller
    assert name not in os.environ  # the next fit, maybe on a cluster, decides again
    monkeypatch.setenv(name, "1")
    with local.preemption_watcher_off():
        assert os.environ[name] == "1"  # the user's own setting wins
    monkeypatch.delenv(name)
    with RaySession(embedded=False).preemption_watcher_off():
        assert name not in os.environ  # a cluster: nodes are drained there, the watcher stays


@pytest.mark.slow
def test_a_run_sharded_on_two_workers_resumes_mid_epoch_on_one_and_trains_every_sample_once(training_root, tmp_path):
    import shutil

    from jobs.run_config import RunConfig
    from jobs.training.history import SampleTrace
    from jobs.training.rows import training_plans
    from pipeline.loaders.batches import EmbeddingBatches
    from tests.test_faults import dalle2

    root = str(tmp_path / "run")
    shutil.copytree(training_root, root)
    trace = tmp_path / "trace"
    # FSDP on 2 workers stops after 3 batches each; the job re-run on 1 worker (replicated) trains the epoch's rest
    sharded = run_config(root, workers=2, parallel="fsdp", batch_size=8, epochs=1, max_steps=3, eval_every=3,
                         checkpoint_every=3, keep_best=True)
    single = run_config(root, workers=1, batch_size=8, epochs=1, max_steps=None, eval_every=100, checkpoint_every=100)
    os.environ[SampleTrace.ENV] = str(trace)
    try:
        first = dalle2("train-prior", sharded, tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        second = dalle2("train-prior", single, tmp_path)
        assert second.returncode == 0, second.stderr[-3000:]
    finally:
        del os.environ[SampleTrace.ENV]
    lines = [json.loads(line) for rank in (0, 1) for line in (trace / f"rank{rank}.jsonl").read_text().splitlines()]
    plan = training_plans(RunConfig.model_validate(single), "train_prior")[0]
    every = sorted(k for batch in EmbeddingBatches(root, plan, plan.size).epoch(0) for k in batch["key"])
    trained = [k for line in lines for k in line["keys"]]
    # none skipped, none twice but the one the 2 workers' equal shares wrapped round to (87 rows: 44 each)
    padding = 2 * -(-plan.size // 2) - plan.size
    assert sorted(set(trained)) == every and len(trained) == len(every) + padding
    steps = sorted({line["step"] for line in lines})
    assert steps == list(range(1, 3 + (len(trained) - 48) // 8 + 1))  # it continued from step 3
    history = read_history(root, "prior")
    assert [line["step"] for line in history if "val_loss" in line] == [3, steps[-1]]
    assert incomplete_reason(json.load(open(TrainLayout(root).best("prior")))["checkpoint"]) is None
