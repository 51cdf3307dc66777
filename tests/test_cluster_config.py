"""The README's cluster example, `configs/cluster-run.yaml`, run as the README shows it: stage by stage through
the installed `dalle2` command, each a driver of a running `ray start` cluster as `ray job submit` starts it, the
root on S3 (moto's server on 127.0.0.1). Only sizes, steps, workers and devices are overridden, and
`embed.clip.pretrained` (no weights offline: a randomly initialised ViT-B-32 of the same architecture). Its prior
(`vit-b-32`) and unet 1 of its decoder (`cascade-64-256`) condition on per-token text encodings, which the training
workers compute from the captions with the run's CLIP. Both keep their structure (levels, attention, text
conditioning, the 64 -> 256 cascade) at laptop widths: at full width two steps cost minutes of CPU and a 1.5 GB
checkpoint, and tests/test_registry.py trains a step of every named architecture at full width."""

import io
import json
import os
import subprocess
import sys
import time

import boto3
import numpy as np
import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "cluster-run.yaml")
DALLE2 = os.path.join(os.path.dirname(sys.executable), "dalle2")  # the console script pip installed

# Laptop sizes for a cluster config: one worker / actor on the CPU, two steps, few diffusion steps.
SMALL = [
    "download.samples_per_shard=12", "download.threads=8", "download.cpus_per_shard=0.5",
    "download.allow_private_network=true",  # the images are served from 127.0.0.1
    "embed.clip.pretrained=null", "embed.batch_size=8", "embed.actors=1", "embed.num_gpus_per_actor=0",
    "embed.cpus_per_actor=1", "embed.decode_concurrency=1", "embed.autocast=none",
    # the CLIP here is randomly initialised: its similarities mean nothing (tests/test_filter.py runs the
    # config's filter section on planted data)
    "filter.min_similarity=null", "filter.duplicate_threshold=null",
    "train_prior.workers=1", "train_prior.use_gpu=false", "train_prior.cpus_per_worker=1",
    "train_prior.batch_size=4", "train_prior.epochs=1", "train_prior.max_steps=2", "train_prior.eval_every=2",
    "train_prior.checkpoint_every=2", "train_prior.eval_size=4",
    "train_prior.prior={base: vit-b-32, net: {depth: 2}, diffusion: {timesteps: 1000, sample_timesteps: 4}}",
    "train_decoder.workers=1", "train_decoder.use_gpu=false", "train_decoder.cpus_per_worker=1",
    "train_decoder.batch_size=2", "train_decoder.epochs=1", "train_decoder.max_steps=2",
    "train_decoder.eval_every=2", "train_decoder.checkpoint_every=2", "train_decoder.eval_size=2",
    "train_decoder.eval_samples=1",
    # cascade-64-256's two unets, as its file lists them, at a quarter of the width (the list is replaced whole)
    "train_decoder.decoder={base: cascade-64-256, diffusion: [{timesteps: 1000, sample_timesteps: 3}, "
    "{timesteps: 1000, sample_timesteps: 3}], unets: ["
    "{dim: 32, dim_mults: [1, 2, 3, 4], num_resnet_blocks: 2, image_embed_dim: 512, cond_on_text_encodings: true, "
    "layer_attns: [false, true, true, true], layer_cross_attns: [false, true, true, true]}, "
    "{dim: 16, dim_mults: [1, 2, 4, 8], num_resnet_blocks: [1, 2, 2, 2], image_embed_dim: 512, lowres_cond: true, "
    "layer_attns: false, layer_cross_attns: [false, false, false, true]}]}",
]


def ray_start_flags(command: str) -> tuple[dict[str, str], dict[str, str]]:
    """(environment assignments, --flags) of the `ray start` in one of cluster.yaml's shell commands."""
    import shlex

    words = shlex.split(command.split(";")[-1])
    at = words.index("ray")
    assert words[at + 1] == "start", command
    env = dict(w.split("=", 1) for w in words[:at])
    flags = dict((w[2:].split("=", 1) + [""])[:2] for w in words[at + 2:] if w.startswith("--"))
    return env, flags


def test_cluster_yaml_keeps_the_dashboard_on_localhost_with_token_auth_and_the_readme_says_how_to_reach_it():
    import yaml

    with open(os.path.join(REPO, "cluster.yaml")) as f:
        cluster = yaml.safe_load(f)
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    head_env, head = ray_start_flags(cluster["head_start_ray_commands"][-1])
    # the dashboard's Jobs API runs whatever it is sent: never on every interface of the head
    assert "head" in head and head.get("dashboard-host") == "127.0.0.1", head
    for command in starts:
        env, _ = ray_start_flags(command)
        assert env.get("RAY_AUTH_MODE") == "token", command
    assert cluster["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "ray dashboard cluster.yaml" in readme and "ssh -L 8265:localhost:8265" in readme
    assert "export RAY_AUTH_MODE=token RAY_ADDRESS=http://localhost:8265" in readme and "<head-ip>:8265" not in readme


def dalle2(*args: str, timeout: int = 420, ray_address: str | None = None) -> str:
    """Run the installed `dalle2` command in a fresh process (a driver of the Ray at `ray_address`, as `ray job
    submit` runs one); its stdout, or the test fails with its log."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    done = subprocess.run([DALLE2, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, f"dalle2 {' '.join(args[:1])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def summary_of(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def check_stage(stage: str, summary: dict) -> None:
    """What each stage's summary line must say for the 24 rows."""
    if stage == "download":
        assert summary["rows_in"] == 24 and summary["written"] == 24, summary
    if stage == "embed":
        assert summary["written"] == 24 and summary["failed"] == 0, summary
    if stage == "filter":
        assert summary["rows_in"] == 24 == summary["written"], summary
    if stage == "train-prior":
        assert summary["step"] == 2 and np.isfinite(summary["loss"]), summary
        assert -1 <= summary["image_similarity"] <= 1  # the held-out evaluation ran through the text path
    if stage == "train-decoder":
        assert summary["step"] == 2 and np.isfinite(summary["loss"]) and "sample_mse" in summary, summary


@pytest.mark.slow
def test_cluster_example_config_runs_stage_by_stage_on_s3(s3_server, image_server, tmp_path):
    bucket = s3_server()
    root = f"{bucket}/dalle2/run-1"
    # the URL list as the example names it: a parquet in the bucket with URL and TEXT columns
    rows = pd.DataFrame(image_server.rows(with_failures=False)[:24]).rename(columns={"url": "URL", "caption": "TEXT"})
    buffer = io.BytesIO()
    rows.to_parquet(buffer)
    name = bucket[len("s3://"):]
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=name, Key="laion-subset.parquet", Body=buffer.getvalue())
    overrides = [f"root={root}", f"download.url_list={bucket}/laion-subset.parquet", *SMALL]
    args = ["--config", CONFIG] + [x for s in overrides for x in ("--set", s)]

    # each stage a driver of a running cluster, as `ray job submit` starts it: a head that runs drivers only and
    # one worker node with both of cluster.yaml's pools (tests/test_multinode.py spreads them over four nodes)
    from tests.servers import RayCluster

    seconds = {}
    with RayCluster(workers=1, cpus=4, head_cpus=0, node_resources=[{"cpu_pool": 1000, "gpu_pool": 1000}]) as cluster:
        for stage in ("download", "embed", "filter", "train-prior", "train-decoder"):
            started = time.time()
            out = dalle2(stage, *args, ray_address=cluster.address)
            seconds[stage] = round(time.time() - started, 1)
            check_stage(stage, summary_of(out))

    out_png, out_npy = tmp_path / "grid.png", tmp_path / "images.npy"
    started = time.time()
    dalle2("sample", "--root", root, "--prompt", "a red circle on the left", "--n", "1",
           "--out", str(out_png), "--out-npy", str(out_npy))
    seconds["sample"] = round(time.time() - started, 1)
    images = np.load(out_npy)
    assert images.shape == (1, 256, 256, 3) and images.dtype == np.uint8  # the cascade's final size
    assert out_png.stat().st_size > 0

    status = dalle2("status", "--root", root)
    assert "24 rows in, 24 written" in status and "train-prior" in status and "train-decoder" in status
    print("seconds per stage:", json.dumps(seconds))
