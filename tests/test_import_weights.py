"""`dalle2 import`: DALLE2-pytorch checkpoints (made by their own trainers, tests/fixtures/dalle2_pytorch/make.py) into
a run that samples, exports back and fine-tunes; LAION's released configs build every weight their checkpoints hold."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle2.dalle2_pytorch_format import decoder_config_from_theirs, decoder_state_from_theirs, \
    decoder_state_to_theirs, load_their_checkpoint, prior_config_from_theirs, prior_state_from_theirs, \
    prior_state_to_theirs, read_their_config
from dalle2.decoder import Decoder
from dalle2.prior import DiffusionPrior
from dalle2.trainer import DecoderTrainer, PriorTrainer
from jobs import cli

FIXTURES = Path(__file__).parent / "fixtures" / "dalle2_pytorch"
LAION = Path(__file__).parents[1] / "configs" / "dalle2_pytorch"
PRIOR, PRIOR_CONFIG = str(FIXTURES / "prior_trained.trainer.pt"), str(FIXTURES / "prior_trained.json")
DECODER, DECODER_CONFIG = str(FIXTURES / "decoder_trained.pt"), str(FIXTURES / "decoder_trained.json")


def test_laions_released_configs_build_every_weight_their_checkpoints_hold():
    """LAION's prior (dim 768, depth 24, 32 heads...) and decoder (unet dim 320...) from their JSON files: our models,
    exported, have their state dicts' every key at its shape (the shapes DALLE2-pytorch 1.15.6 builds, on meta)."""
    theirs = json.loads((FIXTURES / "laion_shapes.json").read_text())
    prior_config = prior_config_from_theirs(read_their_config(LAION / "laion_prior.json"))
    decoder_config = decoder_config_from_theirs(read_their_config(LAION / "laion_decoder.json"))
    assert prior_config.net.arch == "reference" and prior_config.net.normformer and prior_config.net.num_timesteps == 1000
    assert decoder_config.unets[0].sparse_attn and decoder_config.unets[0].memory_efficient
    with torch.device("meta"):  # 1.2 billion parameters: shapes only
        ours = {"prior": prior_state_to_theirs(DiffusionPrior(config=prior_config)),
                "decoder": decoder_state_to_theirs(Decoder(config=decoder_config))}
    for kind in ("prior", "decoder"):
        shapes = {k: list(v.shape) for k, v in ours[kind].items()}
        assert sorted(shapes) == sorted(theirs[kind]), kind
        wrong = {k: (shapes[k], v) for k, v in theirs[kind].items() if shapes[k] != v}
        assert not wrong, wrong


def imported(root, *extra) -> dict:
    argv = ["import", "--set", f"root={root}", "--prior", PRIOR, "--prior-config", PRIOR_CONFIG,
            "--decoder", DECODER, "--decoder-config", DECODER_CONFIG, *extra]
    assert cli.main(argv) == 0


def test_an_imported_run_samples_exports_their_checkpoints_and_imports_them_again(tmp_path, capsys):
    root = tmp_path / "run"
    imported(root)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]).keys() == {"prior", "decoder"}
    out, array = tmp_path / "grid.png", tmp_path / "images.npy"
    assert cli.main(["sample", "--root", str(root), "--prompt", "a red square", "--prompt", "a blue one", "--n", "2",
                     "--out", str(out), "--out-npy", str(array)]) == 0
    images = np.load(array)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    assert Image.open(out).size[1] >= 2 * 16  # one row per prompt

    # export: their checkpoints again, weight for weight (the decoder came in as float16: the same values)
    assert cli.main(["import", "--root", str(root), "--export", str(tmp_path / "theirs")]) == 0
    for name, original in (("prior", PRIOR), ("decoder", DECODER)):
        exported = torch.load(tmp_path / "theirs" / f"{name}.pth", weights_only=True)
        source = load_their_checkpoint(original)
        weights = [k for k in source if k.startswith(("net.", "unets."))]
        assert weights and set(weights) <= set(exported)
        for key in weights:
            assert torch.equal(exported[key], source[key].float()), key
    # and back into another run, from the exported files and configs
    again = tmp_path / "again"
    assert cli.main(["import", "--set", f"root={again}", "--prior", str(tmp_path / "theirs" / "prior.pth"),
                     "--prior-config", str(tmp_path / "theirs" / "prior.json"),
                     "--decoder", str(tmp_path / "theirs" / "decoder.pth"),
                     "--decoder-config", str(tmp_path / "theirs" / "decoder.json")]) == 0


def test_a_clip_of_another_width_and_an_unsupported_option_are_refused_before_any_weight(tmp_path, capsys):
    root = tmp_path / "run"
    # the parity fixture's prior is 32 wide: the run's CLIP (tiny-clip) embeds to 64
    code = cli.main(["import", "--set", f"root={root}", "--prior", str(tmp_path / "never-read.pth"),
                     "--prior-config", str(FIXTURES / "prior_laion.json")])
    error = capsys.readouterr().err
    assert code == 2 and "embed.clip (tiny-clip) does not fit the imported prior" in error and "64" in error
    config = json.loads(Path(PRIOR_CONFIG).read_text())
    config["prior"]["net"]["self_cond"] = True
    (tmp_path / "self_cond.json").write_text(json.dumps(config))
    code = cli.main(["import", "--set", f"root={root}", "--prior", str(tmp_path / "never-read.pth"),
                     "--prior-config", str(tmp_path / "self_cond.json")])
    assert code == 2 and "prior.net.self_cond = True is not supported" in capsys.readouterr().err
    assert not (root / "train").exists()


def fixed_loss(model, seeds: int = 6, **batch) -> float:
    """The model's loss on a batch, averaged over fixed draws of timesteps, noise and dropped conditioning."""
    model.eval()  # no dropout: the same draws score every model alike
    with torch.no_grad():
        losses = []
        for seed in range(seeds):
            torch.manual_seed(1000 + seed)
            losses.append(model(**batch).item())
    model.train()
    return sum(losses) / len(losses)


def test_an_imported_prior_and_decoder_start_below_fresh_ones_on_their_data_and_fine_tune_down():
    """Their trainers trained these on the data stored beside them: ours, imported, scores lower there than a fresh
    model of the same config, and fine-tuning with our trainer (a fresh optimizer) lowers it further."""
    data = torch.load(FIXTURES / "prior_trained.data.pt", weights_only=True)
    prior_batch = {"text_embed": data["text_embed"].float(), "image_embed": data["image_embed"].float()}
    config = prior_config_from_theirs(read_their_config(PRIOR_CONFIG))
    prior = DiffusionPrior(config=config)
    prior.load_state_dict(prior_state_from_theirs(load_their_checkpoint(PRIOR), config))
    torch.manual_seed(0)
    fresh, start = fixed_loss(DiffusionPrior(config=config), **prior_batch), fixed_loss(prior, **prior_batch)
    trainer, generator = PriorTrainer(prior, lr=3e-4), torch.Generator().manual_seed(0)
    for _ in range(60):
        rows = torch.randint(0, len(prior_batch["text_embed"]), (32,), generator=generator)
        trainer.train_step({k: v[rows] for k, v in prior_batch.items()})
    tuned = fixed_loss(prior, **prior_batch)
    assert start < 0.6 * fresh and tuned < 0.97 * start, (fresh, start, tuned)

    data = torch.load(FIXTURES / "decoder_trained.data.pt", weights_only=True)
    decoder_batch = {"image": data["images"].float() / 255, "image_embed": data["image_embed"].float(),
                     "text_encodings": data["text_encodings"].float()}
    config = decoder_config_from_theirs(read_their_config(DECODER_CONFIG))
    decoder = Decoder(config=config)
    decoder.load_state_dict(decoder_state_from_theirs(load_their_checkpoint(DECODER), config))
    torch.manual_seed(0)
    fresh, start = fixed_loss(Decoder(config=config), 3, **decoder_batch), fixed_loss(decoder, 3, **decoder_batch)
    trainer = DecoderTrainer(decoder, lr=3e-4)
    for _ in range(40):
        rows = torch.randint(0, len(decoder_batch["image"]), (16,), generator=generator)
        trainer.train_step({k: v[rows] for k, v in decoder_batch.items()})
    tuned = fixed_loss(decoder, 3, **decoder_batch)
    assert start < 0.6 * fresh and tuned < 0.98 * start, (fresh, start, tuned)
