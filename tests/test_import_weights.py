"""`dalle2 import`: DALLE2-pytorch checkpoints (made by their own trainers, tests/fixtures/dalle2_pytorch/make.py) into
a run that samples, exports back and fine-tunes; LAION's released configs build every weight their checkpoints hold."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2.configs import PriorConfig
from dalle2.interop.configs import decoder_config_from_theirs, prior_config_from_theirs, read_their_config
from dalle2.interop.weights import decoder_state_from_theirs, decoder_state_to_theirs, load_their_checkpoint, \
    prior_state_from_theirs, prior_state_to_theirs
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


def imported(root, *extra) -> None:
    argv = ["import", "--set", f"root={root}", "--prior", PRIOR, "--prior-config", PRIOR_CONFIG,
            "--decoder", DECODER, "--decoder-config", DECODER_CONFIG, *extra]
    assert cli.main(argv) == 0


def test_an_imported_run_samples_exports_their_checkpoints_and_imports_them_again(tmp_path, capsys):
    root = tmp_path / "run"
    imported(root)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]).keys() == {"prior", "decoder"}
    cli.main(["status", "--root", str(root)])
    shown = capsys.readouterr().out
    assert f"train-prior-imported imported from {PRIOR}" in shown and "train-decoder-imported imported from" in shown
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
    # a checkpoint that does not load leaves the run as it was too: no config, no checkpoint
    code = cli.main(["import", "--set", f"root={root}", "--prior", str(tmp_path / "never-there.pth"),
                     "--prior-config", PRIOR_CONFIG])
    assert code == 2 and "never-there.pth" in capsys.readouterr().err
    assert not root.exists()


def test_their_clip_entries_become_open_clip_names_and_others_are_refused():
    from jobs.import_weights import their_clip

    assert their_clip({"clip": {"make": "openai", "model": "ViT-L/14"}}) == {"model_name": "ViT-L-14",
                                                                              "pretrained": "openai"}
    import open_clip

    tag = dict(open_clip.list_pretrained())["ViT-B-32"]  # as their OpenClipAdapter picks it
    assert their_clip({"clip": {"make": "open_clip", "model": "ViT-B-32"}}) == {"model_name": "ViT-B-32",
                                                                                 "pretrained": tag}
    assert their_clip({}) is None
    with pytest.raises(ValueError, match="clip.make 'x-clip' is not an open_clip CLIP"):
        their_clip({"clip": {"make": "x-clip", "model": "mine"}})


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


def run_of_their_data(root) -> None:
    """A run whose aligned embeddings are the rows their trainer trained the imported prior on."""
    from tests.runs import make_training_run

    data = torch.load(FIXTURES / "prior_trained.data.pt", weights_only=True)
    make_training_run(str(root), count=256, per_shard=64, dim=64,
                      embeddings=(data["image_embed"].float().numpy(), data["text_embed"].float().numpy()))


def test_init_from_is_refused_by_name_when_it_cannot_start_the_job(tmp_path):
    from dalle2.checkpoint import COMPLETE_FILE
    from jobs.checkpoints import init_source
    from jobs.config_io import ConfigError
    from jobs.run_config import RunConfig
    from tests.runs import make_training_run

    root = tmp_path / "run"
    run_of_their_data(root)
    imported(root)
    config = RunConfig.model_validate({"root": str(root), "train_prior": {"init_from": str(root)}})
    folder, prior_config = init_source(config, "train_prior")
    assert folder.endswith("prior_imported/checkpoint_imported") and prior_config.net.arch == "reference"
    # a model setting that contradicts the checkpoint's
    contradicting = RunConfig.model_validate({"root": str(root), "train_prior": {"init_from": folder, "prior": "tiny"}})
    with pytest.raises(ConfigError, match=r"train_prior\.prior differs from the model train_prior\.init_from"):
        init_source(contradicting, "train_prior", driver=True)
    # a run whose embeddings are of another width
    narrow = tmp_path / "narrow"
    make_training_run(str(narrow), count=64, per_shard=32, dim=32)
    other = RunConfig.model_validate({"root": str(narrow), "train_prior": {"init_from": folder}})
    with pytest.raises(ConfigError, match=r"takes 64-dim CLIP embeddings, the run's are 32-dim"):
        init_source(other, "train_prior")
    # a checkpoint whose save was cut short (no COMPLETE marker) is never started from, named or found in a root
    (Path(folder) / COMPLETE_FILE).unlink()
    named = RunConfig.model_validate({"root": str(root), "train_prior": {"init_from": folder}})
    with pytest.raises(ConfigError, match=r"train_prior\.init_from: checkpoint .* is incomplete"):
        init_source(named, "train_prior")
    with pytest.raises(ConfigError, match=r"neither a checkpoint folder nor a run root with a prior checkpoint"):
        init_source(config, "train_prior")


@pytest.mark.slow
def test_train_prior_fine_tunes_an_imported_prior_on_the_data_it_was_trained_on(tmp_path, ray_local):
    """The job starts from the imported weights (a fresh optimizer at step 0): its first losses are far below a fresh
    prior's on these rows, and its weights end lower still; a re-run resumes its own checkpoint, not init_from."""
    import yaml

    from dalle2.checkpoint import load_checkpoint, load_state
    from jobs import train_prior
    from jobs.checkpoints import latest_checkpoint
    from jobs.training.history import read_history

    root = tmp_path / "run"
    run_of_their_data(root)
    imported(root)
    fields = dict(init_from=str(root), workers=1, batch_size=64, max_steps=20, log_every=5, eval_every=20,
                  checkpoint_every=20, epochs=20, trainer={"lr": 3e-4})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"root": str(root), "train_prior": fields}))
    summary = train_prior.main(["--config", str(tmp_path / "run.yaml")])
    assert summary["step"] == 20 and summary["resumed_from_step"] == 0

    data = torch.load(FIXTURES / "prior_trained.data.pt", weights_only=True)
    batch = {"text_embed": data["text_embed"].float(), "image_embed": data["image_embed"].float()}
    imported_folder = latest_checkpoint(str(root), "prior_imported")
    config = PriorConfig(**load_state(imported_folder)["config"])
    torch.manual_seed(0)
    fresh = fixed_loss(DiffusionPrior(config=config), **batch)
    start = DiffusionPrior(config=config)
    load_checkpoint(imported_folder, start, config.model_dump(mode="json"))
    tuned = DiffusionPrior(config=config)
    load_checkpoint(latest_checkpoint(str(root), "prior"), tuned, config.model_dump(mode="json"))
    losses = [line["loss"] for line in read_history(str(root), "prior") if "loss" in line]
    assert losses[0] < 0.8 * fresh, (losses, fresh)  # step 5: still near the imported model's loss
    assert fixed_loss(tuned, **batch) < fixed_loss(start, **batch) < 0.6 * fresh

    # a re-run with more steps resumes the job's own checkpoint (step 20), not the imported weights
    fields["max_steps"] = 25
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"root": str(root), "train_prior": fields}))
    assert train_prior.main(["--config", str(tmp_path / "run.yaml")])["resumed_from_step"] == 20


def test_sample_defaults_to_the_runs_sampling_settings_and_says_which_it_used(tmp_path):
    root = tmp_path / "run"
    imported(root, "--set", "sampling.prior_cond_scale=2", "--set", "sampling.decoder_cond_scale=3",
             "--set", "sampling.candidates=3")

    def sample(name: str, *flags: str) -> tuple[np.ndarray, dict]:
        out = tmp_path / f"{name}.png"
        assert cli.main(["sample", "--root", str(root), "--prompt", "a red square", "--n", "2", "--out", str(out),
                         "--out-npy", str(tmp_path / f"{name}.npy"), *flags]) == 0
        return np.load(tmp_path / f"{name}.npy"), json.loads((tmp_path / f"{name}.json").read_text())

    default, used = sample("default")
    assert used["sampling"] == {"prior_cond_scale": 2.0, "decoder_cond_scale": 3.0, "candidates": 3,
                                "sampler": None, "steps": None}
    spelled_out, _ = sample("spelled", "--prior-cond-scale", "2", "--decoder-cond-scale", "3", "--candidates", "3")
    assert np.array_equal(default, spelled_out)  # the run's settings are what it used
    unguided, used = sample("unguided", "--cond-scale", "1")
    assert used["sampling"]["prior_cond_scale"] == used["sampling"]["decoder_cond_scale"] == 1.0
    assert not np.array_equal(default, unguided)
    fast, used = sample("fast", "--sampler", "dpmpp", "--steps", "4")
    assert used["sampling"]["sampler"] == "dpmpp" and used["sampling"]["steps"] == 4
    assert fast.shape == default.shape and fast.std() > 0 and not np.array_equal(default, fast)


def test_a_config_that_still_says_train_decoder_cond_scale_keeps_its_guidance(caplog):
    from pydantic import ValidationError

    from jobs.run_config import RunConfig

    run = RunConfig.model_validate({"train_decoder": {"cond_scale": 2.5, "batch_size": 4}})
    assert run.sampling.decoder_cond_scale == 2.5 and run.train_decoder.batch_size == 4
    assert "sampling.decoder_cond_scale" in caplog.text
    with pytest.raises(ValidationError, match="give it once"):
        RunConfig.model_validate({"train_decoder": {"cond_scale": 2.5}, "sampling": {"decoder_cond_scale": 3}})
