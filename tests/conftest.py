"""Shared fixtures: one thread per test process keeps CPU timings steady on 2 cores."""

import os

from tests.ports import free_port

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Ray Train's controller looks at its workers every 2 s: a finished fit waited ~4 s more to be seen, each of the
# suite's ~30 fits (the controller reads it from the driver's environment, as do the demo subprocesses)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# s3:// in tests means moto's S3 server on 127.0.0.1. The variables are set before anything starts
# (Ray workers included) so that every process's s3fs/botocore talks to it and to nothing else.
MOTO_PORT = free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
})

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip():
    """The randomly initialised 32 px CLIP from dalle2/model_configs/clip/tiny-clip.json."""
    from dalle2 import ClipAdapter

    torch.manual_seed(0)
    return ClipAdapter("tiny-clip")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 4 logical CPUs (2-CPU clusters deadlock Ray Data pipelines)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def image_server():
    """Generated images and failure cases over HTTP on 127.0.0.1."""
    from tests.servers import ImageServer

    with ImageServer(count=60) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real S3 API over HTTP); yields a function making a fresh bucket."""
    import itertools

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    counter = itertools.count()

    def new_bucket() -> str:
        name = f"test-bucket-{next(counter)}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    yield new_bucket
    server.stop()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`dalle2 demo` as the README says: the installed command, no arguments, from a folder of its own (about 7
    minutes; a shorter training left one sample in three off its position on some machines). Run once: the README
    test checks it, and the service and sampling-mode tests use its trained run. `done`: the finished process."""
    import subprocess
    import sys
    from types import SimpleNamespace

    cwd = tmp_path_factory.mktemp("newcomer")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [os.path.join(os.path.dirname(sys.executable), "dalle2"), "demo"]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    return SimpleNamespace(done=done, root=str(cwd / "runs" / "demo"), cwd=cwd)

