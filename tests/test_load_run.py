"""load_dalle2 (what `dalle2 sample` uses) gathers the decoder's unets from the jobs that trained them and
refuses a cascade with a unet that no job trained, instead of sampling through its random weights."""

import pytest
import torch

from dalle2.configs import DecoderConfig, PriorConfig, resolve
from dalle2.decoder import Decoder
from dalle2.prior import DiffusionPrior
from dalle2.trainer import DecoderTrainer, PriorTrainer
from jobs.checkpoints import load_dalle2
from jobs.run_config import RunConfig
from jobs.training.config import TrainDecoderConfig
from pipeline.run.layout import TrainLayout
from pipeline.run.storage import write_json

CASCADE = {"unets": [{"dim": 16, "dim_mults": [1, 2], "image_embed_dim": 64, "layer_attns": False},
                     {"dim": 8, "dim_mults": [1, 2], "image_embed_dim": 64, "lowres_cond": True, "groups": 4,
                      "layer_attns": False, "layer_cross_attns": False}],
           "image_sizes": [16, 32], "diffusion": {"timesteps": 20, "sample_timesteps": 2}}


def save_job(root: str, job: str, trainer) -> None:
    """A checkpoint where Ray Train would put it, and the job's summary naming it."""
    checkpoint = f"{TrainLayout(root).storage}/{job}/checkpoint_000000"
    trainer.save(checkpoint)
    write_json(f"{TrainLayout(root).storage}/{job}_summary.json", {"step": trainer.step, "checkpoint": checkpoint})


def unet_trainer(number: int) -> DecoderTrainer:
    trainer = DecoderTrainer(Decoder(config=resolve(DecoderConfig, CASCADE, "decoder")), unet_numbers=[number], lr=1e-2)
    trainer.train_step({"image": torch.rand(2, 3, 32, 32), "image_embed": torch.randn(2, 64)}, unet_number=number)
    return trainer


def test_each_unet_comes_from_the_job_that_trained_it(tmp_path):
    torch.manual_seed(0)
    root = str(tmp_path / "run")
    run = RunConfig(root=root)
    save_job(root, "prior", PriorTrainer(DiffusionPrior(config=resolve(PriorConfig, "tiny", "prior"))))
    second = unet_trainer(2)
    save_job(root, TrainDecoderConfig(unet_number=2).job_name, second)
    with pytest.raises(FileNotFoundError, match=r"decoder unets \[1\] were never trained"):
        load_dalle2(run)

    first = unet_trainer(1)
    save_job(root, TrainDecoderConfig(unet_number=1).job_name, first)
    dalle2 = load_dalle2(run)
    for number, trainer in ((1, first), (2, second)):
        with trainer.ema_weights():
            for key, value in trainer.model.unets[number - 1].state_dict().items():
                assert torch.equal(value, dalle2.decoder.unets[number - 1].state_dict()[key]), (number, key)
    images = dalle2(["a red circle on the left"], generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32)


def test_caption_encoder_uses_the_runs_trained_clip(tmp_path):
    from dalle2.clip import ClipAdapter
    from jobs.checkpoints import CaptionEncoder

    torch.manual_seed(0)
    root = str(tmp_path / "run")
    trained = ClipAdapter("tiny-clip")
    checkpoint = f"{TrainLayout(root).storage}/clip/checkpoint_000000"
    trained.save(checkpoint)
    write_json(f"{TrainLayout(root).storage}/clip_summary.json", {"step": 1, "checkpoint": checkpoint})

    encoder = CaptionEncoder(RunConfig(root=root), device="cpu")
    captions = ["a red circle on the left", "a blue square"]
    out = encoder(captions)
    expected = trained.embed_text(captions)
    torch.testing.assert_close(out["text_encodings"], expected.text_encodings)
    assert torch.equal(out["text_mask"], expected.mask) and out["text_mask"][1].sum() < out["text_mask"][0].sum()
    assert not encoder.clip.training and not any(p.requires_grad for p in encoder.clip.parameters())
    with pytest.raises(ValueError, match=r"train_prior.prior.net.text_encoding_dim: .*width \d+, the model takes 77 of width 999"):
        encoder.check(999, 77, "train_prior.prior.net.text_encoding_dim")
