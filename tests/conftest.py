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
