"""Kill a stage midway (SIGKILL, the whole process group), re-run it: outputs equal an uninterrupted run's."""

import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from pipeline.execution.session import RaySession
from pipeline.run.config import DownloadConfig
from pipeline.stages.download.stage import run_download
from pipeline.run.layout import RunLayout
from pipeline.formats.shard_reader import iter_samples
from pipeline.run.storage import list_files
from tests.processes import kill_session


def start_job(stage: str, config: dict, tmp_path, env: dict | None = None) -> subprocess.Popen:
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / f"{stage}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", f"jobs.{stage}", "--config", str(path)], stdout=log, stderr=log,
                            start_new_session=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                            env={**os.environ, **(env or {})})
    proc.log_path = tmp_path / f"{stage}.log"
    return proc


def kill_after_first_record(proc: subprocess.Popen, ledger_dir, total: int, tmp_path, timeout: float = 180) -> int:
    """SIGKILL the job's whole session (its Ray workers too) once it has finished at least one shard but not all;
    returns when none of its processes is left to write into the run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(list_files(str(ledger_dir), ".json"))
        if done >= 1:
            kill_session(proc.pid)
            proc.wait()
            assert done < total, "the job finished before it could be killed"
            return done
        if proc.poll() is not None:
            pytest.fail(f"job ended early with {proc.returncode}: {proc.log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    kill_session(proc.pid)
    pytest.fail("the job finished no shard in time")


def shard_contents(root: str) -> dict[str, dict]:
    layout = RunLayout(root)
    out = {}
    for tar in list_files(layout.shards, ".tar"):
        for key, fields in iter_samples(tar):
            assert key not in out, f"duplicate sample {key}"
            out[key] = {"txt": fields["txt"], "jpg": fields["jpg"]}
    return out


@pytest.fixture(scope="module")
def url_list(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("resume") / "urls.csv"
    pd.DataFrame(image_server.rows(with_failures=False)).to_csv(path, index=False)
    return str(path)


@pytest.mark.slow
def test_download_killed_midway_resumes_to_the_same_shards(url_list, image_server, tmp_path, ray_local):
    fields = dict(url_list=url_list, image_size=32, samples_per_shard=10, threads=2, timeout=60, allow_private_network=True)
    reference = run_download(DownloadConfig(**fields), str(tmp_path / "reference"), RaySession())

    root = str(tmp_path / "killed")
    # the first shard's images are served, the others' held until the kill: it lands after one shard's record and
    # before any other's, however fast the machine (the requests' deadline outlasts the hold)
    later = [row["url"] for row in image_server.rows(with_failures=False)[10:]]
    with image_server.holding(later):
        job = start_job("download", {"root": root, "download": {**fields, "cpus_per_shard": 4}}, tmp_path)
        killed_after = kill_after_first_record(job, tmp_path / "killed" / "ledger" / "download", total=6,
                                               tmp_path=tmp_path)
    assert killed_after == 1

    resumed = run_download(DownloadConfig(**fields), root, RaySession())
    for key in ("rows_in", "written", "failed", "shards"):
        assert resumed[key] == reference[key]
    assert shard_contents(root) == shard_contents(str(tmp_path / "reference"))


