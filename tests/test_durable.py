"""Nothing torn by a crash: durable atomic writes, and checkpoints that count only once their COMPLETE marker
(written last, listing every file's size and sha256) is there and matches."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dalle2.checkpoint import (COMPLETE_FILE, EMA_FILE, MODEL_FILE, STATE_FILE, IncompleteCheckpointError,
                               incomplete_reason, load_state, load_weights, save_checkpoint)
from jobs.checkpoints import latest_checkpoint
from pipeline.run.layout import TrainLayout
from dalle2 import faults
from pipeline.run.storage import write_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_atomic_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "new" / "deeper" / "record.json"
    write_atomic(str(target), b'{"rows_in": 3}')
    assert target.read_bytes() == b'{"rows_in": 3}'
    order = [(kind, os.path.relpath(path, tmp_path)) for kind, path in calls]
    data = next(i for i, (kind, path) in enumerate(order) if kind == "fsync" and ".tmp-" in path)
    rename = order.index(("replace", "new/deeper/record.json"))
    assert data < rename  # the data is on disk before its name
    assert ("fsync", "new/deeper") in order[rename:]  # the rename itself is made durable
    assert ("fsync", "new") in order[:rename] and ("fsync", ".") in order[:rename]  # so are the new folders' names


def save(root, step: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    weights = {"w": torch.randn(64, 8)}
    save_checkpoint(str(root), weights, {"kind": "toy"}, ema={"w": weights["w"] * 0.5}, state={"steps": [step]})
    return weights


def test_a_checkpoint_is_complete_only_with_its_marker_written_last(tmp_path):
    weights = save(tmp_path / "ckpt", step=7)
    marker = json.loads((tmp_path / "ckpt" / COMPLETE_FILE).read_text())
    assert marker["step"] == 7 and set(marker["files"]) == {MODEL_FILE, EMA_FILE, STATE_FILE}
    for name, listed in marker["files"].items():
        assert listed["bytes"] == (tmp_path / "ckpt" / name).stat().st_size and len(listed["sha256"]) == 64
    assert incomplete_reason(str(tmp_path / "ckpt")) is None
    assert torch.equal(load_weights(str(tmp_path / "ckpt"))["w"], weights["w"])
    assert load_state(str(tmp_path / "ckpt"))["steps"] == [7]
    assert not [p for p in os.listdir(tmp_path / "ckpt") if ".tmp-" in p]  # temporary names all renamed


def test_killed_in_the_middle_of_a_file_leaves_no_torn_file_under_its_name(tmp_path):
    folder = tmp_path / "ckpt"
    script = ("import sys, torch; from dalle2.checkpoint import save_checkpoint; w = {'w': torch.ones(4096)}; "
              "save_checkpoint(sys.argv[1], w, {'kind': 'toy'}, ema=w, state={'steps': [6]})")
    env = {**os.environ, faults.ENV_POINTS: "storage.mid_write@2", faults.ENV_STATE: str(tmp_path / "crash")}
    done = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]  # killed half way through its second file (the EMA weights)
    names = sorted(os.listdir(folder))
    assert names[1] == MODEL_FILE and names[0].startswith(EMA_FILE + ".tmp-") and len(names) == 2, names
    with pytest.raises(IncompleteCheckpointError, match="COMPLETE marker is missing"):
        load_weights(str(folder))


def test_a_torn_state_without_its_marker_is_refused_naming_the_folder_and_the_marker(tmp_path):
    folder = tmp_path / "ckpt"
    save(folder, step=3)
    (folder / COMPLETE_FILE).unlink()
    state = (folder / STATE_FILE).read_bytes()
    (folder / STATE_FILE).write_bytes(state[: len(state) // 2])  # what an in-place write left after a crash
    with pytest.raises(IncompleteCheckpointError, match=f"checkpoint {folder} is incomplete: its COMPLETE marker is missing"):
        load_state(str(folder))
    with pytest.raises(IncompleteCheckpointError, match="COMPLETE marker is missing"):
        load_weights(str(folder))


def test_files_that_do_not_match_the_marker_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    save(folder, step=3)
    model = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(model[:-10])  # a marker copied before the file was whole
    assert incomplete_reason(str(folder)) == f"{MODEL_FILE} is {len(model) - 10} bytes, its COMPLETE marker says {len(model)} bytes"
    with pytest.raises(IncompleteCheckpointError, match=f"{folder} is incomplete: {MODEL_FILE} is"):
        load_weights(str(folder))
    flipped = bytearray(model)
    flipped[-1] ^= 0xFF  # same size, other bytes
    (folder / MODEL_FILE).write_bytes(bytes(flipped))
    assert incomplete_reason(str(folder)) is None  # the listing cannot tell; the read does
    with pytest.raises(IncompleteCheckpointError, match=f"{MODEL_FILE} does not match the sha256"):
        load_weights(str(folder))
    (folder / COMPLETE_FILE).write_text("not json")
    with pytest.raises(IncompleteCheckpointError, match="COMPLETE is not a checkpoint marker"):
        load_state(str(folder))


def job_folder(root) -> str:
    folder = os.path.join(TrainLayout(str(root)).storage, "prior")
    os.makedirs(folder, exist_ok=True)
    return folder


def test_latest_checkpoint_passes_over_a_torn_one_for_the_one_before(tmp_path):
    folder = job_folder(tmp_path)
    older, newer = f"{folder}/checkpoint_2026-12-01_10-00-00.000001", f"{folder}/checkpoint_2026-12-01_10-05-00.000001"
    save(older, step=3)
    save(newer, step=6)
    assert latest_checkpoint(str(tmp_path), "prior") == newer
    os.remove(f"{newer}/{COMPLETE_FILE}")
    with open(f"{newer}/{STATE_FILE}", "r+b") as f:
        f.truncate(100)
    assert latest_checkpoint(str(tmp_path), "prior") == older  # by listing
    with open(f"{TrainLayout(str(tmp_path)).storage}/prior_summary.json", "w") as f:
        json.dump({"checkpoint": newer, "step": 6}, f)
    assert latest_checkpoint(str(tmp_path), "prior") == older  # the summary names the torn one: passed over too
    os.remove(f"{older}/{COMPLETE_FILE}")
    assert latest_checkpoint(str(tmp_path), "prior") is None


def test_killed_between_the_files_and_the_marker_the_rerun_uses_the_previous_checkpoint(tmp_path):
    folder = job_folder(tmp_path)
    older, newer = f"{folder}/checkpoint_2026-12-01_10-00-00.000001", f"{folder}/checkpoint_2026-12-01_10-05-00.000001"
    save(older, step=3)
    script = ("import sys, torch; from dalle2.checkpoint import save_checkpoint; "
              "save_checkpoint(sys.argv[1], {'w': torch.ones(4)}, {'kind': 'toy'}, state={'steps': [6]})")
    env = {**os.environ, faults.ENV_POINTS: "checkpoint.before_marker@1", faults.ENV_STATE: str(tmp_path / "crash")}
    done = subprocess.run([sys.executable, "-c", script, newer], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]  # killed by its own SIGKILL, no cleanup
    assert sorted(os.listdir(newer)) == [MODEL_FILE, STATE_FILE]  # every file whole, no marker
    assert latest_checkpoint(str(tmp_path), "prior") == older
    with pytest.raises(IncompleteCheckpointError, match=f"{newer} is incomplete"):
        load_state(newer)
    done = subprocess.run([sys.executable, "-c", script, newer], cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert latest_checkpoint(str(tmp_path), "prior") == newer and load_state(newer)["steps"] == [6]


def test_a_checkpoint_saved_before_markers_is_refused_until_marked(tmp_path):
    folder = tmp_path / "old"
    weights = save(folder, step=5)
    (folder / COMPLETE_FILE).unlink()  # as every checkpoint saved before markers
    with pytest.raises(IncompleteCheckpointError, match="python -m dalle2.checkpoint"):
        load_state(str(folder))
    done = subprocess.run([sys.executable, "-m", "dalle2.checkpoint", str(folder)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(load_weights(str(folder))["w"], weights["w"])
    assert json.loads((folder / COMPLETE_FILE).read_text())["step"] == 5
