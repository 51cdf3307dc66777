"""Shared fixtures: one thread per test process keeps CPU timings steady on 2 cores."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

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
