"""A real Ray cluster of several nodes on this machine, laid out as cluster.yaml lays one out: a head that runs
drivers only (0 CPUs), two CPU workers ({cpu_pool}) and two GPU workers ({gpu_pool}, CPUs standing in for GPUs).
The stages run through the installed `dalle2` command with the run root on S3 (moto's server), placed by the
config's resources; a worker node is SIGKILLed in the middle of download, of embed and of training, and each
stage still ends with every row written once and `dalle2 status` reconciling."""

import os
import subprocess
import sys
import time

import boto3
import pandas as pd
import pytest
import yaml

from pipeline.run.layout import RunLayout
from pipeline.formats.shard_reader import iter_samples
from pipeline.run.storage import list_files, read_json, read_parquet

DALLE2 = os.path.join(os.path.dirname(sys.executable), "dalle2")
POOLS = [{"cpu_pool": 1000}, {"cpu_pool": 1000}, {"gpu_pool": 1000}, {"gpu_pool": 1000}]
CPU_NODES, GPU_NODES = {0, 1}, {2, 3}  # worker numbers; replacements join these
ROWS, PER_SHARD = 48, 6
# the node is lost at the first registered checkpoint (step 25): the steps after it keep the worker busy for the
# seconds that takes, then run again on the surviving node from that checkpoint
TRAIN_STEPS = 150
ON_CPU, ON_GPU = {"cpu_pool": 0.001}, {"gpu_pool": 0.001}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # about 5 min here


@pytest.fixture(scope="module")
def cluster():
    from tests.servers import RayCluster

    with RayCluster(workers=len(POOLS), cpus=2, head_cpus=0, node_resources=POOLS, lost_nodes_fast=True) as cluster:
        yield cluster


def run_config(root: str, url_list: str, clip: str) -> dict:
    return {
        "root": root,
        "download": {"url_list": url_list, "image_size": 32, "samples_per_shard": PER_SHARD, "threads": 2,
                     "cpus_per_shard": 1, "timeout": 20, "shard_retries": 3, "resources": ON_CPU,
                     "allow_private_network": True},
        "train_clip": {"enabled": False},
        "embed": {"clip": {"checkpoint": clip}, "batch_size": 4, "actors": 1, "cpus_per_actor": 1, "decode_cpus": 0.5,
                  "decode_concurrency": 1, "resources": ON_GPU},
        "filter": {"resources": ON_CPU},
        "reorder": {"resources": ON_CPU},
        "train_prior": {"workers": 1, "cpus_per_worker": 1, "resources_per_worker": ON_GPU, "batch_size": 4,
                        "epochs": 1000, "max_steps": TRAIN_STEPS, "checkpoint_every": 25, "eval_every": 1000, "eval_size": 4,
                        "max_failures": 3, "log_every": 100,
                        "prior": {"base": "tiny", "diffusion": {"timesteps": 100, "sample_timesteps": 4}}},
    }


def start(cluster, stage: str, config: dict, folder) -> subprocess.Popen:
    """`dalle2 STAGE --config run.yaml` as a driver of the cluster (RAY_ADDRESS), its output to a log file."""
    path = folder / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(folder / f"{stage}.log", "w")
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([DALLE2, stage, "--config", str(path)], env=env, cwd=folder, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, folder, stage: str, timeout: float = 600) -> None:
    process.wait(timeout=timeout)
    assert process.returncode == 0, (folder / f"{stage}.log").read_text()[-6000:]


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 240):
    """Poll `condition` until it returns something (not None, False or empty: worker number 0 counts); fails if
    the stage ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found is not None and found is not False and not (hasattr(found, "__len__") and len(found) == 0):
            return found
        assert process.poll() is None, f"the stage ended before {what}"
        time.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout} s")


def node_running(cluster, kind: str, match) -> int | None:
    """The worker number of the node where a running task / a live actor (alive, or being created there)
    matching `match` is."""
    for entry in cluster.state(kind, "state=RUNNING" if kind == "tasks" else "state!=DEAD"):
        if match(entry) and entry.get("node_id"):
            return cluster.node_of(entry["node_id"])
    return None


def kill_when(cluster, process, node: int, ready, what: str, done_folder: str) -> int:
    """Once `ready()` holds (and the stage still runs), SIGKILL worker node `node`; then a new node of its pool
    joins, as the autoscaler replaces a lost one (the stage may finish on the survivors before it is up).
    Returns how many records `done_folder` held when the node was lost."""
    wait_for(ready, what, process)
    assert process.poll() is None, f"the stage ended before {what}"
    cluster.kill_node(node)
    done_before = len(list_files(done_folder, ".json"))
    replacement = cluster.add_node(POOLS[node] if node < len(POOLS) else cluster.node_resources[node])
    (GPU_NODES if node in GPU_NODES else CPU_NODES).add(replacement)
    return done_before


def placed_on(cluster, name: str) -> set[int]:
    """Worker numbers of the nodes where tasks whose name contains `name` ran (the dead ones included); fails if
    none ran, so a placement check can never pass on nothing."""
    nodes = {task["node_id"] for task in cluster.state("tasks") if name in task.get("name", "") and task.get("node_id")}
    assert nodes, f"no task named like {name!r} ran"
    return {cluster.node_of(node) for node in nodes}


def registered_checkpoint(folder: str):
    """The checkpoint Ray Train has registered for the run in `folder` (its manager snapshot), or None. A folder
    named checkpoint_* shows up while it is being uploaded, before Ray knows of it: a node lost then restarts
    the run from the previous checkpoint, which for the first one is none."""
    try:
        return read_json(f"{folder}/checkpoint_manager_snapshot.json").get("latest_checkpoint_result")
    except FileNotFoundError:
        return None


def test_stages_across_nodes_survive_a_node_lost_in_download_embed_and_training(
        cluster, s3_server, image_server, tiny_clip, tmp_path):
    bucket = s3_server()
    root = f"{bucket}/run"
    rows = pd.DataFrame(image_server.rows(with_failures=False)[:ROWS])
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=bucket[len("s3://"):], Key="urls.csv", Body=rows.to_csv(index=False).encode())
    clip = str(tmp_path / "clip")
    tiny_clip.save(clip)  # every node loads the same weights, before the kill and after
    config = run_config(root, f"{bucket}/urls.csv", clip)
    layout = RunLayout(root)

    # download: the answers for every shard but the first two are held until the node is lost, so shard tasks
    # are still running when it goes, whatever the machine's speed (the requests' deadline outlasts the hold)
    download = {**config, "download": {**config["download"], "timeout": 240}}
    with image_server.holding(rows["url"][2 * PER_SHARD:]):
        process = start(cluster, "download", download, tmp_path)
        victim = wait_for(lambda: node_running(cluster, "tasks", lambda t: t.get("name") == "_call"),
                          "a download task running", process)
        downloaded_before = kill_when(cluster, process, victim, lambda: list_files(layout.ledger_dir("download"), ".json"),
                                      "a shard downloaded", layout.ledger_dir("download"))
    finish(process, tmp_path, "download")
    assert victim in CPU_NODES and placed_on(cluster, "_call") <= CPU_NODES
    assert 0 < downloaded_before < ROWS // PER_SHARD
    summary = read_json(layout.ledger_summary("download"))
    assert (summary["shards"], summary["rows_in"], summary["written"]) == (ROWS // PER_SHARD, ROWS, ROWS), summary
    keys = [key for tar in list_files(layout.shards, ".tar") for key, _ in iter_samples(tar)]
    assert len(keys) == ROWS and len(set(keys)) == ROWS  # every image once, none twice

    # embed: a GPU node is lost once Ray Data runs the pipeline, while the CLIP actor loads (seconds; embedding 48
    # rows then takes about one, too short to find the actor's node through the state API first): whether it held
    # the actor or decode / write tasks, the stage finishes on the other GPU node
    process = start(cluster, "embed", config, tmp_path)
    victim = min(GPU_NODES)
    embedded_before = kill_when(cluster, process, victim, lambda: "embed: pipeline started" in (tmp_path / "embed.log").read_text(),
                                "the embed pipeline running", layout.ledger_dir("embed"))
    finish(process, tmp_path, "embed")
    assert victim in GPU_NODES
    for name in ("finish_shard", "write_parts", "decode_shards"):
        assert placed_on(cluster, name) <= GPU_NODES, name
    assert embedded_before < ROWS // PER_SHARD  # lost in the middle: shards were left to embed
    aligned_keys = []
    for shard in sorted({k[:5] for k in keys}):
        meta = read_parquet(layout.aligned_files(shard)["metadata"]).to_pydict()
        aligned_keys += [k for k, present in zip(meta["key"], meta["present"]) if present]
    assert sorted(aligned_keys) == sorted(keys)  # every sample embedded, once

    process = start(cluster, "filter", config, tmp_path)
    finish(process, tmp_path, "filter")
    assert placed_on(cluster, "_call") <= CPU_NODES

    # training: the GPU node of the Ray Train worker is lost after a checkpoint; it resumes on the remaining one
    process = start(cluster, "train-prior", config, tmp_path)
    victim = wait_for(lambda: node_running(cluster, "actors", lambda a: "RayTrainWorker" in a.get("class_name", "")),
                      "a training worker", process)
    kill_when(cluster, process, victim, lambda: registered_checkpoint(f"{root}/train/prior"),
              "a registered checkpoint", f"{root}/train/prior")
    finish(process, tmp_path, "train-prior")
    assert victim in GPU_NODES
    trained = read_json(f"{root}/train/prior_summary.json")
    assert trained["step"] == TRAIN_STEPS and 0 < trained["resumed_from_step"] < TRAIN_STEPS, trained

    status = subprocess.run([DALLE2, "status", "--root", root, "--json"], env=cluster.env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    import json

    report = json.loads(status.stdout)
    assert report["problems"] == [] and report["embed"]["written"] == ROWS and report["filter"]["rows_in"] == ROWS

    # reorder, on the CPU nodes: the clip-retrieval files embed wrote, into a second root's aligned layout
    other = f"{bucket}/reordered"
    reorder = {**config, "root": other,
               "reorder": {"source": layout.embeddings, "index_width": 1, "samples_per_shard": PER_SHARD,
                           "resources": ON_CPU}}
    process = start(cluster, "reorder", reorder, tmp_path)
    finish(process, tmp_path, "reorder")
    summary = read_json(RunLayout(other).ledger_summary("reorder"))
    assert summary["written"] == ROWS and summary["input_rows"] == ROWS and not summary["failed_shards"], summary
    assert placed_on(cluster, "_call") <= CPU_NODES
