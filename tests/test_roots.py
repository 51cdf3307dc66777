"""Run roots every process agrees on: relative paths made absolute, memory:// refused, gs:// through gcsfs,
and a local root refused on a Ray cluster of several nodes (its shards would scatter over the nodes' disks)."""

import os
import shutil
import subprocess
import sys
import tempfile

import fsspec
import pytest
import yaml

from jobs.config_io import ConfigError, load_config
from jobs.run_config import RunConfig, load_run_config, save_run_config


def test_a_relative_root_is_made_absolute_and_saved_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(RunConfig, None, ["root=runs/mine"])
    assert config.root == str(tmp_path / "runs" / "mine")
    assert RunConfig().root == str(tmp_path / "runs" / "demo")  # the default too
    save_run_config(config)
    with open(tmp_path / "runs" / "mine" / "config.yaml") as f:
        assert yaml.safe_load(f)["root"] == str(tmp_path / "runs" / "mine")
    # read back from another folder, as a Ray worker would: still the same place
    monkeypatch.chdir("/")
    assert load_run_config(str(tmp_path / "runs" / "mine")).root == str(tmp_path / "runs" / "mine")
    assert load_config(RunConfig, None, [f"root=file://{tmp_path}/x"]).root == str(tmp_path / "x")
    assert load_config(RunConfig, None, ["root=s3://bucket/run"]).root == "s3://bucket/run"


def test_load_run_config_resolves_a_relative_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_run_config("elsewhere").root == str(tmp_path / "elsewhere")


def test_memory_root_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"root: .*memory:// lives inside one process"):
        load_config(RunConfig, None, ["root=memory://run"])


def test_gs_root_resolves_to_gcsfs():
    import gcsfs

    assert fsspec.get_filesystem_class("gs") is gcsfs.GCSFileSystem
    assert load_config(RunConfig, None, ["root=gs://bucket/run"]).root == "gs://bucket/run"


@pytest.mark.slow
def test_a_local_root_is_refused_on_a_cluster_of_several_nodes(tmp_path):
    from tests.servers import RayCluster

    dalle2 = os.path.join(os.path.dirname(sys.executable), "dalle2")
    with RayCluster(workers=1, cpus=1) as cluster:
        done = subprocess.run([dalle2, "download", "--set", "root=runs/local", "--set", f"ray.address={cluster.address}",
                               "--set", "download.url_list=urls.csv"], cwd=tmp_path, env=cluster.env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"root: {tmp_path}/runs/local is a local path but the Ray cluster has 2 nodes" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.slow
def test_a_running_local_ray_is_joined_only_when_asked_and_a_stale_address_file_ignored(tmp_path, image_server):
    """A local Ray kept up with `ray start --head` is joined with ray.address=auto; with no address a stage starts
    its own even then (ray.init() alone would join it and refuse the embedded CPUs and pools), and an address
    file left behind by a cluster that is gone does not stop it either."""
    import pandas as pd

    from pipeline.run.layout import RunLayout
    from pipeline.run.storage import read_json
    from tests.servers import RayCluster

    dalle2 = os.path.join(os.path.dirname(sys.executable), "dalle2")
    url_list = tmp_path / "urls.csv"
    pd.DataFrame(image_server.rows(with_failures=False)[:6]).to_csv(url_list, index=False)

    def download(root, env, *sets):
        """`dalle2 download` of six images in two shards, each a Ray task (the stage's default distributor)."""
        done = subprocess.run([dalle2, "download", "--set", f"root={root}", "--set", f"download.url_list={url_list}",
                               "--set", "download.samples_per_shard=3", "--set", "download.allow_private_network=true",
                               *sets], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert read_json(RunLayout(str(root)).ledger_summary("download"))["written"] == 6
        return done.stderr

    def shard_tasks(cluster) -> int:
        return sum(task.get("name") == "_call" for task in cluster.state("tasks"))

    with RayCluster(cpus=4, as_local_default=True) as cluster:
        env = cluster.env
        download(tmp_path / "own", env)
        assert shard_tasks(cluster) == 0  # ran on a Ray of its own
        joined = download(tmp_path / "joined", env, "--set", "ray.address=auto")
        assert shard_tasks(cluster) == 2  # ran on the cluster ray start keeps up
        assert f":{cluster.port} (address: auto; nodes: 1, CPUs: 4)" in joined  # and said which one it joined
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        os.makedirs(os.path.join(temp, "ray"))
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write(cluster.address)  # that cluster is gone; its address file stays, as after a crash
        download(tmp_path / "stale", {**env, "RAY_TMPDIR": temp})
    finally:
        shutil.rmtree(temp, ignore_errors=True)
