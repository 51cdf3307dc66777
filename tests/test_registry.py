"""Every registered architecture in dalle2/model_configs builds and takes a training step that changes its
weights, with the inputs its config asks for (text encodings where it conditions on them)."""

import pytest
import torch

from dalle2.clip import ClipAdapter
from dalle2.clip_trainer import ClipTrainer
from dalle2.configs import DecoderConfig, PriorConfig, registry_names, resolve
from dalle2.decoder import Decoder
from dalle2.prior import DiffusionPrior
from dalle2.trainer import DecoderTrainer, PriorTrainer


def changed(module: torch.nn.Module, before: dict) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if k in before)


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def text_inputs(batch: int, width: int, length: int) -> dict:
    mask = torch.arange(length).expand(batch, length) < 5
    return {"text_encodings": torch.randn(batch, length, width), "text_mask": mask}


def test_the_registry_lists_what_the_examples_name():
    assert {"tiny", "vit-b-32"} <= set(registry_names("prior"))
    assert {"tiny", "cascade-64-256"} <= set(registry_names("decoder"))
    assert {"tiny-clip", "small-clip"} <= set(registry_names("clip"))


@pytest.mark.parametrize("name", registry_names("clip"))
def test_clip_architecture_trains_a_step(name):
    torch.manual_seed(0)
    clip = ClipAdapter(name)
    trainer = ClipTrainer(clip, lr=1e-3)
    before = snapshot(clip.model)
    loss = trainer.train_step({"image": torch.rand(4, 3, clip.image_size, clip.image_size),
                               "caption": ["a red circle", "a blue square", "a green triangle", "a cat"]})
    assert torch.isfinite(torch.tensor(loss)) and changed(clip.model, before)


@pytest.mark.parametrize("name", registry_names("prior"))
def test_prior_architecture_trains_a_step(name):
    torch.manual_seed(0)
    prior = DiffusionPrior(config=resolve(PriorConfig, name, "prior"))
    net = prior.config.net
    batch = {"text_embed": torch.randn(2, net.resolved_embed_dim), "image_embed": torch.randn(2, net.resolved_embed_dim)}
    if prior.config.condition_on_text_encodings:
        batch.update(text_inputs(2, net.resolved_text_encoding_dim, net.max_text_len))
    trainer = PriorTrainer(prior, lr=1e-3)
    before = snapshot(prior.net)
    assert torch.isfinite(torch.tensor(trainer.train_step(batch))) and changed(prior.net, before)


@pytest.mark.parametrize("name", registry_names("decoder"))
def test_decoder_architecture_trains_a_step_of_every_unet(name):
    torch.manual_seed(0)
    decoder = Decoder(config=resolve(DecoderConfig, name, "decoder"))
    trainer = DecoderTrainer(decoder, lr=1e-3)
    size = decoder.image_sizes[-1]
    for number, unet in enumerate(decoder.config.unets, start=1):
        batch = {"image": torch.rand(1, 3, size, size), "image_embed": torch.randn(1, unet.image_embed_dim)}
        if unet.cond_on_text_encodings:
            batch.update(text_inputs(1, unet.text_encoding_dim or unet.image_embed_dim, unet.max_text_len))
        before = snapshot(decoder.unets[number - 1])
        assert torch.isfinite(torch.tensor(trainer.train_step(batch, unet_number=number)))
        assert changed(decoder.unets[number - 1], before), number
