"""What a user meets first: the dalle2 CLI on a whole run, cluster.yaml, and `ray job submit`."""

import json
import os
import re
import subprocess
import time
import urllib.request

import pandas as pd
import pytest
import yaml

from jobs.config_io import ConfigError, load_config
from jobs.run_config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_is_valid_for_rays_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(open(os.path.join(REPO, "cluster.yaml")))
    validate_config(prepare_config(config))
    assert {"head", "cpu_worker", "gpu_worker"} <= set(config["available_node_types"])
    config["available_node_types"]["gpu_worker"]["max_wokers"] = 2
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(config))


def test_config_errors_name_the_field_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"embed.autocast: .*'none', 'bf16' or 'fp16'"):
        load_config(RunConfig, None, ["embed.autocast=fp8"])
    example = load_config(RunConfig, os.path.join(REPO, "configs", "cluster-run.yaml"))
    assert example.root.startswith("s3://") and example.embed.num_gpus_per_actor == 1


@pytest.fixture()
def ray_head():
    """A real `ray start --head` on 127.0.0.1 with its own ports and temp dir, stopped by the test."""
    from tests.servers import RayCluster

    with RayCluster() as cluster:
        yield cluster.job_address, cluster.env, cluster.ray_bin


@pytest.mark.slow
def test_ray_job_submit_runs_a_stage(ray_head, tmp_path, image_server):
    address, env, ray_bin = ray_head
    url_list = tmp_path / "urls.csv"
    pd.DataFrame(image_server.rows(with_failures=False)[:20]).to_csv(url_list, index=False)
    root = str(tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"root": root, "download": {"url_list": str(url_list), "image_size": 32,
                                                                "samples_per_shard": 10, "allow_private_network": True}}))
    for _ in range(30):  # the head's job agent can come up a little after its job API
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--working-dir", REPO, "--no-wait", "--",
             "python", "-m", "jobs.download", "--config", str(config)],
            env=env, capture_output=True, text=True, cwd=REPO, timeout=180)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)  # the CLI colours its output
    deadline, state = time.time() + 240, ""
    while time.time() < deadline:  # what `ray job status` asks the job server, without a `ray` process a poll
        with urllib.request.urlopen(f"{address}/api/jobs/{job_id}", timeout=30) as response:
            state = json.load(response)["status"]
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    logs = subprocess.run([ray_bin, "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True).stdout
    assert "SUCCEEDED" in state, state + logs[-3000:]
    summary = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    assert summary["written"] == 20 and summary["rows_in"] == 20
