"""The fault matrix: every stage killed (SIGKILL, as a lost node or the OOM killer would) at each of its
crash points, then re-run through the installed CLI; the outputs equal an uninterrupted run's: the same
keys, the same rows (byte-identical where the stage is deterministic), nothing duplicated, and
`dalle2 status` reconciling every row. Training resumes to the same sample sequence."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from dalle2 import faults
from pipeline.formats.aligned import read_aligned
from pipeline.run.layout import RunLayout
from pipeline.formats.shard_reader import iter_samples
from pipeline.run.storage import list_files, read_json, read_parquet
from tests.processes import kill_session
from tests.test_nothing_lost import embeddings_of, write_part

DALLE2 = os.path.join(os.path.dirname(sys.executable), "dalle2")


def dalle2(command: str, config: dict, tmp_path, crash: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`dalle2 COMMAND --config run.yaml`, with a crash point armed (counted from zero in a fresh folder)."""
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    if crash:
        state = tmp_path / f"crash-{crash.replace('@', '-')}"
        shutil.rmtree(state, ignore_errors=True)
        env.update({faults.ENV_POINTS: crash, faults.ENV_STATE: str(state)})
    # its own session: once it ends, crashed or not, whatever of its Ray outlived it (a worker, in its own process
    # group, still writing the run's files) is killed before the test looks at the run or runs it again
    process = subprocess.Popen([DALLE2, command, "--config", str(path)], env=env, cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        kill_session(process.pid)
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def status_of(root: str) -> dict:
    done = subprocess.run([DALLE2, "status", "--root", root, "--json"], capture_output=True, text=True, timeout=120)
    status = json.loads(done.stdout)
    assert done.returncode == 0 and status["problems"] == [], status["problems"]
    return status


def crashed(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == -9  # killed by its own SIGKILL: no cleanup ran


def fired(tmp_path, crash: str) -> bool:
    """Whether the armed point was passed at least N times (so some process was killed there)."""
    name, _, nth = crash.partition("@")
    counter = tmp_path / f"crash-{crash.replace('@', '-')}" / name
    return counter.exists() and counter.stat().st_size >= int(nth or 1)


def shard_contents(root: str) -> dict:
    """Per shard: {key: (image bytes, caption)} of its tar, and {key: status} of its parquet."""
    layout, out = RunLayout(root), {}
    for tar in list_files(layout.shards, ".tar"):
        shard = tar.rsplit("/", 1)[-1][:-4]
        samples = list(iter_samples(tar))
        keys = [k for k, _ in samples]
        assert len(keys) == len(set(keys)), f"duplicate samples in {tar}"
        table = read_parquet(layout.shard_parquet(shard), columns=["key", "status"]).to_pydict()
        out[shard] = ({k: (f.get("png") or f.get("jpg"), f.get("txt")) for k, f in samples},
                      dict(zip(table["key"], table["status"])))
    return out


# ---------------------------------------------------------------- download


@pytest.fixture(scope="module")
def url_list(tmp_path_factory, image_server):
    rows = image_server.rows(with_failures=False)[:40] + [{"url": image_server.url + "/missing.png", "caption": "404"},
                                                          {"url": image_server.url + "/not-an-image.png", "caption": "html"}]
    path = tmp_path_factory.mktemp("urls") / "urls.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def download_config(root, url_list, distributor="local"):
    return {"root": root, "download": {"url_list": url_list, "image_size": 32, "samples_per_shard": 14, "threads": 4,
                                       "timeout": 4, "distributor": distributor, "shard_retries": 1,
                                       "allow_private_network": True}}


@pytest.fixture(scope="module")
def download_reference(tmp_path_factory, url_list):
    folder = tmp_path_factory.mktemp("download-reference")
    root = str(folder / "run")
    assert dalle2("download", download_config(root, url_list), folder).returncode == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("crash,distributor", [
    ("download.mid_shard@20", "local"),  # shard 2's tar half written
    ("download.after_outputs@2", "local"),  # shard 2 complete (and its input consumed), no ledger record
    ("storage.mid_write@3", "local"),  # an input shard's file torn in the middle of the URL-list split
    ("download.after_outputs@1", "ray"),  # a Ray worker lost: the task is retried within the same run
])
def test_download_killed_then_rerun_equals_an_uninterrupted_run(tmp_path, url_list, download_reference, crash, distributor):
    root = str(tmp_path / "run")
    first = dalle2("download", download_config(root, url_list, distributor), tmp_path, crash=crash)
    assert fired(tmp_path, crash), first.stderr[-3000:]  # on Ray too, where the run itself ends well: a worker died
    if distributor == "local":
        assert crashed(first), first.stderr[-3000:]
        again = dalle2("download", download_config(root, url_list, distributor), tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
    else:
        assert first.returncode == 0, first.stderr[-3000:]  # the worker died; Ray ran the shard again
    assert shard_contents(root) == shard_contents(download_reference)
    assert not os.listdir(f"{root}/_scratch/download")  # img2dataset's input copies are consumed
    got, want = status_of(root)["download"], status_of(download_reference)["download"]
    for field in ("shards", "rows_in", "written", "failed", "failed_by_reason", "input_rows"):
        assert got[field] == want[field], field


# ---------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, tiny_clip):
    folder = str(tmp_path_factory.mktemp("clip") / "clip")
    tiny_clip.save(folder)  # every embed run loads these same weights
    return folder


@pytest.fixture(scope="module")
def embed_reference(tmp_path_factory, download_reference, clip_folder):
    folder = tmp_path_factory.mktemp("embed-reference")
    root = str(folder / "run")
    shutil.copytree(download_reference, root)
    done = dalle2("embed", embed_config(root, clip_folder), folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def embed_config(root, clip):
    return {"root": root, "train_clip": {"enabled": False}, "embed": {"batch_size": 8, "clip": {"checkpoint": clip}}}


def assert_same_aligned(root: str, reference: str, exact: bool) -> None:
    shards = [u.rsplit("/", 1)[-1][:-8] for u in list_files(RunLayout(reference).aligned, ".parquet")]
    assert shards and shards == [u.rsplit("/", 1)[-1][:-8] for u in list_files(RunLayout(root).aligned, ".parquet")]
    for shard in shards:
        got, want = read_aligned(RunLayout(root), shard, mmap=False), read_aligned(RunLayout(reference), shard, mmap=False)
        assert got.keys == want.keys and got.captions == want.captions
        np.testing.assert_array_equal(got.present, want.present)
        for name in ("img_emb", "text_emb"):
            a, b = getattr(got, name), getattr(want, name)
            if exact:
                assert a.tobytes() == b.tobytes(), (shard, name)
            else:  # CLIP on other batch compositions: equal up to float16 rounding
                np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


@pytest.mark.slow
# (a file torn mid-write is storage's, the same for every stage: the download and reorder cases hold it)
@pytest.mark.parametrize("crash", ["embed.between_files@2", "embed.after_outputs@1", "embed.after_submit@2"])
def test_embed_killed_then_rerun_equals_an_uninterrupted_run(tmp_path, download_reference, embed_reference, clip_folder,
                                                            crash):
    root = str(tmp_path / "run")
    shutil.copytree(download_reference, root)
    first = dalle2("embed", embed_config(root, clip_folder), tmp_path, crash=crash)
    assert fired(tmp_path, crash)
    # a shard's outputs are written by a Ray task: the worker killed there is retried in the same run; a kill in
    # the driver ends the run, and a second one finishes it
    assert crashed(first) or first.returncode == 0, first.stderr[-3000:]
    if crash.startswith("embed.after_submit"):  # the driver itself: the first run ended there
        assert crashed(first)
    again = dalle2("embed", embed_config(root, clip_folder), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_aligned(root, embed_reference, exact=False)
    for n in range(3):  # clip-retrieval's files: the same keys, once each
        keys = read_parquet(RunLayout(root).clip_retrieval_files(n)["metadata"]).column("key").to_pylist()
        want = read_parquet(RunLayout(embed_reference).clip_retrieval_files(n)["metadata"]).column("key").to_pylist()
        assert keys == want and len(set(keys)) == len(keys)
    got, want = status_of(root)["embed"], status_of(embed_reference)["embed"]
    assert (got["rows_in"], got["written"], got["failed"]) == (want["rows_in"], want["written"], want["failed"])


# ---------------------------------------------------------------- reorder


def clip_retrieval_output(folder: str) -> None:
    """Three parts whose rows are spread over three shards of 5 slots, in no order."""
    keys = [f"{s:05d}{i}" for s in range(3) for i in range(5) if (s, i) != (1, 3)]
    order = np.random.default_rng(0).permutation(len(keys))
    for part, rows in enumerate(np.array_split(order, 3)):
        chosen = [keys[r] for r in rows]
        write_part(folder, str(part), chosen, embeddings_of(chosen), embeddings_of(chosen) * 2)


@pytest.fixture(scope="module")
def reorder_reference(tmp_path_factory) -> tuple[str, str]:
    """(the clip-retrieval output, an uninterrupted reorder of it): every crash case reorders the same source."""
    folder = tmp_path_factory.mktemp("reorder-reference")
    source, reference = str(folder / "clip-retrieval"), str(folder / "reference")
    clip_retrieval_output(source)
    assert dalle2("reorder", reorder_config(reference, source), folder).returncode == 0
    return source, reference


def reorder_config(root, source):
    return {"root": root, "reorder": {"source": source, "index_width": 1, "samples_per_shard": 5, "distributor": "local"}}


# ---------------------------------------------------------------- filter


def filter_masks(root: str) -> dict:
    """Every shard's final mask, column by column."""
    layout = RunLayout(root)
    return {shard: read_parquet(layout.filter_mask(shard)).to_pydict() for shard in ("00000", "00001", "00002")}


def filter_config(root: str) -> dict:
    from tests.test_filter import CONFIG

    return {"root": root, "filter": CONFIG}


@pytest.fixture(scope="module")
def filter_reference(tmp_path_factory):
    """An uninterrupted filter run over tests/test_filter.py's planted shards (the same every time they are made)."""
    from tests.test_filter import planted_run

    folder = tmp_path_factory.mktemp("filter-reference")
    reference = str(folder / "reference")
    planted_run(reference)
    assert dalle2("filter", filter_config(reference), folder).returncode == 0
    return reference


@pytest.mark.parametrize("crash", ["filter.after_mask@2",  # shard 2's mask written, no record
                                   "filter.mid_search@2",  # the run-wide index holds shard 1's rows only
                                   "filter.mid_search@3"])
def test_filter_killed_then_rerun_equals_an_uninterrupted_run(tmp_path, filter_reference, crash):
    from tests.test_filter import planted_run

    reference, root = filter_reference, str(tmp_path / "run")
    expected = planted_run(root)
    first = dalle2("filter", filter_config(root), tmp_path, crash=crash)
    assert crashed(first) and fired(tmp_path, crash), first.stderr[-3000:]
    again = dalle2("filter", filter_config(root), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert filter_masks(root) == filter_masks(reference)
    dropped = {k: r for mask in filter_masks(root).values() for k, keep, r in zip(mask["key"], mask["keep"], mask["reason"])
               if not keep and r != "absent"}
    assert dropped == expected  # every planted fault, the cross-shard duplicates too, and nothing else
    got, want = status_of(root)["filter"], status_of(reference)["filter"]
    for field in ("shards", "rows_in", "written", "failed", "failed_by_reason"):
        assert got[field] == want[field], field
    assert not os.path.exists(RunLayout(root).scratch("filter"))  # the first pass's masks are gone once done


@pytest.mark.parametrize("crash", ["reorder.mid_split@2", "reorder.after_split@1", "reorder.after_outputs@2",
                                   "storage.mid_write@4"])
def test_reorder_killed_then_rerun_equals_an_uninterrupted_run(tmp_path, reorder_reference, crash):
    source, reference = reorder_reference
    root = str(tmp_path / "run")
    assert crashed(dalle2("reorder", reorder_config(root, source), tmp_path, crash=crash))
    again = dalle2("reorder", reorder_config(root, source), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_aligned(root, reference, exact=True)
    summary = read_json(RunLayout(root).ledger_summary("reorder"))
    assert summary["written"] == summary["input_rows"] == 14 and summary["failed"] == 0
    assert not os.path.exists(f"{root}/_scratch/reorder")  # removed once every shard is gathered
    status_of(root)


# ---------------------------------------------------------------- training


def train_config(root, max_failures):
    return {"root": root, "train_prior": {"workers": 2, "batch_size": 8, "eval_size": 8, "eval_every": 4,
                                          "checkpoint_every": 3, "max_steps": 9, "epochs": 5, "keep_checkpoints": 5,
                                          "max_failures": max_failures, "shuffle_buffer": 16}}


@contextlib.contextmanager
def tracing(folder):
    """While inside, every `dalle2` started here logs each rank's batch keys per step under `folder`."""
    from jobs.training.history import SampleTrace

    os.environ[SampleTrace.ENV] = str(folder)
    try:
        yield
    finally:
        del os.environ[SampleTrace.ENV]


def trace(folder) -> dict[int, list[list[str]]]:
    """Per rank, the key lists of the steps in the order they were trained (a resumed run appends)."""
    out = {}
    for rank in (0, 1):
        with open(os.path.join(folder, f"rank{rank}.jsonl")) as f:
            out[rank] = [json.loads(line) for line in f]
    return out


@pytest.fixture(scope="module")
def training_reference(tmp_path_factory):
    """An uninterrupted run's sample trace, on a run whose filter dropped rows (the caption embeddings are a random
    map of the image's: some fall below cosine 0), so the same run shows training never sees a dropped row."""
    from pipeline.run.config import FilterConfig
    from tests.runs import make_training_run

    folder = tmp_path_factory.mktemp("train-reference")
    root = str(folder / "run")
    make_training_run(root, count=144, per_shard=48, size=32, dim=64,  # about half kept: 4 steps an epoch
                      filter_config=FilterConfig(min_similarity=0.0, on_large_clip_drop="continue",
                                                 distributor="local"))
    pristine = str(folder / "pristine")
    shutil.copytree(root, pristine)
    with tracing(folder / "trace"):
        done = dalle2("train-prior", train_config(root, 0), folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return pristine, trace(folder / "trace")


@pytest.mark.slow
def test_training_never_sees_a_dropped_row(training_reference):
    pristine, reference = training_reference
    masks = [read_parquet(RunLayout(pristine).filter_mask(f"{s:05d}")).to_pydict() for s in range(3)]
    kept = {k for m in masks for k, keep in zip(m["key"], m["keep"]) if keep}
    dropped = {k for m in masks for k, keep in zip(m["key"], m["keep"]) if not keep}
    assert len(dropped) >= 5 and len(kept) + len(dropped) == 144
    seen = {key for lines in reference.values() for line in lines for key in line["keys"]}
    assert seen <= kept and not seen & dropped
    assert len(seen) >= len(kept) - 8  # every kept row but the 8 held out for evaluation


@pytest.mark.slow
@pytest.mark.parametrize("crash,max_failures", [("train.mid_step@9", 0), ("train.mid_checkpoint@2", 1)])
def test_training_killed_resumes_to_the_same_sample_sequence(tmp_path, training_reference, crash, max_failures):
    pristine, reference = training_reference
    root = str(tmp_path / "run")
    shutil.copytree(pristine, root)
    with tracing(tmp_path / "trace"):
        first = dalle2("train-prior", train_config(root, max_failures), tmp_path, crash=crash)
        if max_failures == 0:  # the run fails with its worker; the re-run resumes from the last checkpoint
            assert first.returncode != 0
            first = dalle2("train-prior", train_config(root, max_failures), tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]  # with max_failures=1 Ray Train restarted it in-run
    summary = read_json(f"{root}/train/prior_summary.json")
    assert summary["step"] == 9 and 0 < summary["resumed_from_step"] < 9 and summary["resumed_from_step"] % 3 == 0
    got = trace(tmp_path / "trace")
    resumed = summary["resumed_from_step"]
    for rank in (0, 1):
        want = {e["step"]: e["keys"] for e in reference[rank]}
        assert [e["step"] for e in reference[rank]] == list(range(1, 10))
        # before the crash and after the resume point, every step saw exactly the reference's samples
        for entry in got[rank]:
            assert 0 < len(entry["keys"]) <= 8 and entry["keys"] == want[entry["step"]], (rank, entry["step"])
        after = [e["step"] for e in got[rank]][-(9 - resumed):]
        assert after == list(range(resumed + 1, 10))
