"""NegCLIP's hard negatives: captions with two content words swapped, contrasted with each image beside the batch."""

import math
import random

import pytest
import torch

from dalle2.clip_trainer import ClipTrainer, caption_swaps, info_nce, swapped_caption


def test_a_swap_keeps_the_words_and_moves_two_content_words():
    caption = "a red square on the left"
    seen = set()
    for seed in range(50):
        swapped = swapped_caption(caption, random.Random(seed))
        assert sorted(swapped.split()) == sorted(caption.split()) and swapped != caption
        moved = [(a, b) for a, b in zip(caption.split(), swapped.split()) if a != b]
        assert len(moved) == 2 and {a for a, _ in moved} <= {"red", "square", "left"}
        seen.add(swapped)
    # all three pairs of its content words get swapped, and nothing else: the set the benchmark scores against
    assert seen == {"a square red on the left", "a left square on the red", "a red left on the square"}
    assert caption_swaps(caption) == ["a square red on the left", "a left square on the red", "a red left on the square"]


@pytest.mark.parametrize("caption", ["a cat", "the the of", "red red", ""])
def test_a_caption_without_two_distinct_content_words_has_no_negative(caption):
    assert swapped_caption(caption, random.Random(0)) is None


def test_a_negative_is_contrasted_with_its_image_only():
    image = torch.tensor([[1.0, 0.0]])
    own = torch.tensor([[1.0, 0.0]])
    scale = torch.tensor(math.log(100.0))
    assert info_nce(image, own, ["x"], scale) == pytest.approx(0.0)
    # a negative as close as the caption: the image's side splits its mass in two; the text's side never sees it
    assert info_nce(image, torch.cat([own, own]), ["x"], scale) == pytest.approx(math.log(2) / 2, abs=1e-6)
    # a far negative costs next to nothing
    assert info_nce(image, torch.cat([own, -own]), ["x"], scale) < 1e-6


def test_the_trainer_adds_swapped_captions_to_the_batch(tiny_clip):
    torch.manual_seed(0)
    batch = {"image": torch.rand(4, 3, 32, 32),
             "caption": ["a red square on the left", "a blue circle on the right", "a green triangle in the center",
                         "a cat"]}
    plain = ClipTrainer(tiny_clip, lr=1e-3).compute_loss(batch, 0)
    hard = ClipTrainer(tiny_clip, lr=1e-3, hard_negatives=True).compute_loss(batch, 0)
    # three more captions in every image's softmax, none of them its own: the loss can only grow
    assert float(hard) > float(plain) + 1e-4


def test_hard_negatives_need_a_clip_to_train():
    from jobs.config_io import ConfigError, load_config
    from jobs.run_config import RunConfig

    assert load_config(RunConfig, overrides=["train_clip.hard_negatives=true"]).train_clip.hard_negatives
    with pytest.raises(ConfigError, match="train_clip.hard_negatives.*train_clip.enabled is false"):
        load_config(RunConfig, overrides=["train_clip.hard_negatives=true", "train_clip.enabled=false"])
