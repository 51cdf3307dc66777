"""Training at scale, one process: learning-rate schedules, per-unet learning rates, gradient checkpointing, upsamplers
trained on random crops, and each sample's random draws keyed by the sample."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from dalle2 import Decoder, DecoderTrainer, DiffusionPrior, DiffusionPriorNetwork, PriorTrainer
from dalle2.configs import DecoderConfig
from dalle2.trainer_config import TrainerConfig
from dalle2.decoder import random_crops
from dalle2.interop.configs import decoder_config_from_theirs, decoder_config_to_theirs, prior_config_from_theirs
from dalle2.layers import set_gradient_checkpointing
from dalle2.row_random import RowRandom, sample_seeds

EMBED = 16
FIXTURES = Path(__file__).parent / "fixtures" / "dalle2_pytorch"
UNET = dict(dim=16, dim_mults=(1, 2), image_embed_dim=EMBED, cond_dim=16, attn_heads=2, attn_dim_head=8, groups=4)


def tiny_prior() -> DiffusionPrior:
    torch.manual_seed(0)
    return DiffusionPrior(net=DiffusionPriorNetwork(dim=32, depth=2, heads=2, dim_head=16, embed_dim=EMBED),
                          timesteps=100)


def cascade(**kwargs) -> Decoder:
    torch.manual_seed(0)
    return Decoder(unets=[UNET, {**UNET, "lowres_cond": True}], image_sizes=(16, 32), timesteps=50, **kwargs)


def prior_batch(rows: int = 4) -> dict:
    return dict(text_embed=torch.randn(rows, EMBED), image_embed=torch.randn(rows, EMBED))


# ---- learning-rate schedules -----------------------------------------------------------------------------------

def expected_lr(step: int, schedule: str, lr=1e-3, floor=1e-4, warmup=2, decay=10) -> float:
    """The schedule by hand: linear warm-up, then the decay from lr to floor over steps warmup..decay."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (decay - warmup))
    shape = {"cosine": (1 + math.cos(math.pi * progress)) / 2, "linear": 1 - progress, "constant": 1.0}[schedule]
    return lr if schedule == "constant" else floor + (lr - floor) * shape


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_each_step_runs_at_its_schedules_learning_rate_and_a_resumed_trainer_continues_it(schedule, tmp_path):
    config = TrainerConfig(lr=1e-3, warmup_steps=2, lr_schedule=schedule, min_lr=1e-4, decay_steps=10)
    trainer = PriorTrainer(tiny_prior(), config)
    used = []
    for step in range(12):
        used.append(trainer.optimizers[0].param_groups[0]["lr"])
        trainer.train_step(prior_batch())
        if step == 5:
            trainer.save(str(tmp_path / "ckpt"))
    assert used == pytest.approx([expected_lr(step, schedule) for step in range(12)], rel=1e-9)
    if schedule != "constant":  # at a quarter of the decay the shapes differ (0.854 vs 0.75 of the way down)
        assert used[4] == pytest.approx(1e-4 + 9e-4 * (0.8536 if schedule == "cosine" else 0.75), rel=1e-3)
    resumed = PriorTrainer(tiny_prior(), config)
    resumed.load(str(tmp_path / "ckpt"))
    continued = []
    for _ in range(6, 12):
        continued.append(resumed.optimizers[0].param_groups[0]["lr"])
        resumed.train_step(prior_batch())
    assert continued == pytest.approx(used[6:], rel=1e-9)


def test_a_decaying_schedule_spans_the_jobs_planned_steps_or_needs_decay_steps():
    config = TrainerConfig(lr=1e-3, lr_schedule="linear", min_lr=0.0)
    trainer = PriorTrainer(tiny_prior(), config, planned_steps=4)
    used = []
    for _ in range(5):
        used.append(trainer.optimizers[0].param_groups[0]["lr"])
        trainer.train_step(prior_batch())
    assert used == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    with pytest.raises(ValueError, match="trainer.decay_steps"):
        PriorTrainer(tiny_prior(), config)


def test_learning_rate_settings_out_of_bounds_are_refused_by_name():
    with pytest.raises(ValidationError, match="min_lr"):
        TrainerConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValidationError, match="decay_steps"):
        TrainerConfig(warmup_steps=100, decay_steps=50)
    with pytest.raises(ValueError, match=r"trainer\.lr has 3 values"):
        DecoderTrainer(cascade(), lr=[1e-3, 2e-4, 1e-4])


def test_a_job_refuses_a_list_of_learning_rates_of_another_length_before_any_worker_starts():
    from jobs.config_io import ConfigError
    from jobs.run_config import RunConfig
    from jobs.training.driver import check_per_part_settings

    run = RunConfig(train_decoder={"trainer": {"lr": [1e-4, 1e-4, 1e-4]}}, train_prior={"trainer": {"min_lr": [0.0, 0.0]}})
    with pytest.raises(ConfigError, match=r"train_decoder\.trainer\.lr has 3 values: give one per unet of the decoder \(2\)"):
        check_per_part_settings(run.train_decoder, "train_decoder", 2)
    check_per_part_settings(run.train_decoder, "train_decoder", 3)
    with pytest.raises(ConfigError, match=r"train_prior\.trainer\.min_lr has 2 values: give one value"):
        check_per_part_settings(run.train_prior, "train_prior", 1)


def test_each_unet_trains_at_its_own_learning_rate_whichever_stages_a_trainer_takes():
    both = DecoderTrainer(cascade(), lr=[1e-3, 2e-4], min_lr=[1e-4, 2e-5], lr_schedule="cosine", decay_steps=4)
    assert [o.param_groups[0]["lr"] for o in both.optimizers] == [1e-3, 2e-4]
    second = DecoderTrainer(cascade(), lr=[1e-3, 2e-4], unet_numbers=[2])
    assert [o.param_groups[0]["lr"] for o in second.optimizers] == [2e-4]
    batch = dict(image=torch.rand(2, 3, 32, 32), image_embed=torch.randn(2, EMBED))
    for _ in range(4):
        for number in (1, 2):
            both.train_step(batch, unet_number=number)
    # each unet decayed to its own floor
    assert [o.param_groups[0]["lr"] for o in both.optimizers] == pytest.approx([1e-4, 2e-5])


# ---- gradient checkpointing ------------------------------------------------------------------------------------

def reference_prior() -> DiffusionPrior:
    torch.manual_seed(0)
    config = prior_config_from_theirs(json.loads((FIXTURES / "prior_options.json").read_text()))
    return DiffusionPrior(config=config.model_copy(update={"net": config.net.model_copy(update={"attn_dropout": 0.1})}))


def reference_decoder() -> Decoder:
    torch.manual_seed(0)
    return Decoder(config=decoder_config_from_theirs(json.loads((FIXTURES / "decoder_options.json").read_text())))


def gradients_and_recomputations(model, loss_of, part, on: bool) -> tuple[dict, int]:
    """Every parameter's gradient of one loss (the same random draws), and how often the first checkpointed block
    ran forward."""
    model = copy.deepcopy(model).train()
    part = dict(model.named_modules())[part]
    set_gradient_checkpointing(part, on)
    blocks = [m for m in part.modules() if type(m).__name__ in ("TransformerBlock", "ResnetBlock", "NullKeyAttention")]
    calls = []
    blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # a recomputation may stop before the end
    torch.manual_seed(1)
    loss_of(model).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, len(calls)


def _decoder_loss(batch_size: int, image: int, embed: int, unet_number: int):
    def loss(model):
        return model(image=torch.rand(batch_size, 3, image, image), image_embed=torch.randn(batch_size, embed),
                     unet_number=unet_number, seeds=torch.arange(batch_size))
    return loss


@pytest.mark.parametrize("name", ["prior", "reference prior", "unet", "reference unet"])
def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(name):
    prior_loss = lambda model: model(**prior_batch(), seeds=torch.arange(4))  # noqa: E731
    model, loss_of, part = {
        "prior": (tiny_prior(), prior_loss, "net"),
        "reference prior": (reference_prior(), lambda model: model(
            text_embed=torch.randn(3, model.config.net.resolved_embed_dim), seeds=torch.arange(3),
            image_embed=torch.randn(3, model.config.net.resolved_embed_dim),
            **({"text_encodings": torch.randn(3, 5, model.config.net.resolved_text_encoding_dim)}
               if model.config.condition_on_text_encodings else {})), "net"),
        "unet": (cascade(), _decoder_loss(2, 32, EMBED, 2), "unets.1"),
        "reference unet": (reference_decoder(), None, "unets.0"),
    }[name]
    if loss_of is None:
        c = model.config
        loss_of = _decoder_loss(2, c.image_sizes[0], c.unets[0].image_embed_dim, 1)
    plain, once = gradients_and_recomputations(model, loss_of, part, on=False)
    checkpointed, twice = gradients_and_recomputations(model, loss_of, part, on=True)
    assert (once, twice) == (1, 2)  # run again in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def test_a_trainer_switches_checkpointing_on_in_the_parts_it_trains_only():
    decoder = cascade()
    DecoderTrainer(decoder, gradient_checkpointing=True, unet_numbers=[2])
    assert [u.gradient_checkpointing for u in decoder.unets] == [False, True]


# ---- upsamplers on random crops --------------------------------------------------------------------------------

def test_a_crop_takes_the_same_window_of_the_target_and_of_its_low_res_input():
    rows = torch.arange(32.0)[:, None].expand(32, 32)
    where = torch.stack([rows, rows.T])[None].repeat(6, 1, 1, 1)  # channel 0: the row, channel 1: the column
    target, lowres = random_crops([where, where + 100], 8, RowRandom(6, "cpu", torch.arange(6)))
    assert target.shape == (6, 2, 8, 8) and torch.equal(lowres, target + 100)
    tops, lefts = target[:, 0, 0, 0], target[:, 1, 0, 0]
    assert torch.equal(target[:, 0, :, 0] - tops[:, None], torch.arange(8.0).expand(6, 8))  # contiguous windows
    assert len(set(zip(tops.tolist(), lefts.tolist()))) > 1  # each sample its own place


def test_an_upsampler_trains_on_crops_and_samples_at_full_size():
    decoder = cascade(random_crop_sizes=(None, 16))
    seen = []
    decoder.unets[1].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    trainer = DecoderTrainer(decoder, lr=3e-3, unet_numbers=[2])
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    embeds = torch.randn(4, EMBED)
    losses = [trainer.train_step(dict(image=images, image_embed=embeds, seeds=torch.arange(4) + 10 * step),
                                 unet_number=2) for step in range(30)]
    assert set(seen) == {(16, 16)}
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses  # it learns from the crops
    seen.clear()
    decoder.diffusions[1].sample_timesteps = None
    sampled = trainer.sample(image_embed=embeds[:2], start_image=torch.rand(2, 3, 16, 16), start_at_unet_number=2)
    assert sampled.shape == (2, 3, 32, 32) and set(seen) == {(32, 32)}


def test_crop_sizes_are_checked_against_each_unet():
    unets = [UNET, {**UNET, "lowres_cond": True}]
    with pytest.raises(ValidationError, match=r"random_crop_sizes\[1\]=32 must be smaller than image_sizes\[1\]=32"):
        DecoderConfig(unets=unets, image_sizes=(16, 32), random_crop_sizes=(None, 32))
    with pytest.raises(ValidationError, match=r"random_crop_sizes\[1\]=13 .* a multiple of 2"):
        DecoderConfig(unets=unets, image_sizes=(16, 32), random_crop_sizes=(None, 13))
    with pytest.raises(ValidationError, match=r"random_crop_sizes\[0\] must be None"):
        DecoderConfig(unets=unets, image_sizes=(16, 32), random_crop_sizes=(8, 16))


def test_their_random_crop_sizes_come_in_and_go_back_out():
    theirs = json.loads((FIXTURES / "decoder_options.json").read_text())
    theirs = theirs.get("decoder", theirs)
    count, size = len(theirs["unets"]), (theirs.get("image_sizes") or [theirs.get("image_size")])[-1]
    if count < 2:
        pytest.skip("the fixture decoder has one unet")
    crops = [None] * (count - 1) + [size // 2]
    ours = decoder_config_from_theirs({**theirs, "random_crop_sizes": crops})
    assert list(ours.random_crop_sizes) == crops
    assert decoder_config_to_theirs(ours)["random_crop_sizes"] == crops


# ---- each sample's own random draws ----------------------------------------------------------------------------

def test_a_samples_draws_do_not_depend_on_its_batch():
    seeds = sample_seeds([f"{i:06d}" for i in range(6)], seed=0, epoch=0)
    assert sample_seeds(["000003"], seed=0, epoch=0) == seeds[3]
    assert sample_seeds(["000003"], seed=0, epoch=1) != seeds[3] != sample_seeds(["000003"], seed=1, epoch=0)
    prior, batch = tiny_prior(), prior_batch(6)
    whole = prior(**batch, seeds=seeds)
    split = (prior(**{k: v[:2] for k, v in batch.items()}, seeds=seeds[:2]) * 2 +
             prior(**{k: v[2:] for k, v in batch.items()}, seeds=seeds[2:]) * 4) / 6
    torch.testing.assert_close(split, whole)
    decoder = cascade(random_crop_sizes=(None, 16))
    images, embeds = torch.rand(6, 3, 32, 32), torch.randn(6, EMBED)
    for number in (1, 2):
        whole = decoder(image=images, image_embed=embeds, unet_number=number, seeds=seeds)
        split = (decoder(image=images[:3], image_embed=embeds[:3], unet_number=number, seeds=seeds[:3]) +
                 decoder(image=images[3:], image_embed=embeds[3:], unet_number=number, seeds=seeds[3:])) / 2
        torch.testing.assert_close(split, whole)
        assert decoder(image=images, image_embed=embeds, unet_number=number, seeds=seeds + 1) != whole


# ---- keep_best -------------------------------------------------------------------------------------------------

def test_the_best_checkpoint_is_the_lowest_validation_loss_so_far_across_a_resume(tmp_path):
    from jobs.training.best import BestCheckpoint, read_best
    from pipeline.run.layout import TrainLayout

    root = str(tmp_path / "run")
    saved = []

    def save(folder: str) -> None:  # what trainer.save leaves: a folder with a file in it
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        saved.append(folder)

    best = BestCheckpoint(root, "prior", rank=0)
    decisions = [best.consider(step, {"val_loss": loss}, save) for step, loss in
                 [(2, 3.0), (4, 2.0), (6, 2.5), (8, 1.0), (10, 1.5), (12, None)]]
    assert decisions == [True, True, False, True, False, False]
    assert [folder.rsplit("/", 1)[-1].split("_")[1] for folder in saved] == ["2", "4", "8"]
    assert read_best(root, "prior") == {"checkpoint": saved[-1], "step": 8, "val_loss": 1.0}
    assert saved[-1].startswith(TrainLayout(root).best_checkpoint("prior", 8) + "_")
    best_folder = Path(TrainLayout(root).job("prior")) / "best"
    assert [str(p) for p in best_folder.iterdir()] == [saved[-1]]
    # a resumed job knows the best so far; a replayed step that does better than itself writes a folder of its own,
    # never over the one the pointer names; another rank decides alike and calls save too (a sharded model is
    # gathered from every rank; the trainer writes on rank 0 alone) but points at and deletes nothing
    resumed, other_rank = BestCheckpoint(root, "prior", rank=0), BestCheckpoint(root, "prior", rank=1)
    assert not resumed.consider(8, {"val_loss": 1.2}, save) and resumed.consider(8, {"val_loss": 0.9}, save)
    assert len(saved) == 4 and saved[-1] != saved[-2]
    assert read_best(root, "prior") == {"checkpoint": saved[-1], "step": 8, "val_loss": 0.9}
    assert [str(p) for p in best_folder.iterdir()] == [saved[-1]]
    pointed = saved[-1]
    assert other_rank.consider(8, {"val_loss": 0.8}, lambda folder: saved.append(folder)) and len(saved) == 5
    assert read_best(root, "prior")["checkpoint"] == pointed and [str(p) for p in best_folder.iterdir()] == [pointed]


def test_keep_best_says_when_it_has_nothing_to_keep(tmp_path, caplog):
    from jobs.training.best import BestCheckpoint

    best = BestCheckpoint(str(tmp_path), "prior", rank=0)
    assert not best.consider(2, {"loss": 1.0}, save=lambda folder: None)
    assert not best.consider(4, {"loss": 0.5}, save=lambda folder: None)
    warned = [r.message for r in caplog.records if "keep_best keeps nothing" in r.message]
    assert len(warned) == 1 and "step 2 has no val_loss" in warned[0]


# ---- tracking --------------------------------------------------------------------------------------------------

def test_rank_zero_logs_metrics_artifacts_and_the_config_to_mlflow_and_other_ranks_nothing(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs.run_config import RunConfig
    from jobs.training.tracking import Tracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = RunConfig(root=str(tmp_path / "my-run"), tracking={"mlflow": True}, train_prior={"batch_size": 7})
    for rank in (1, 0):
        tracker = Tracker(run, run.train_prior, rank)
        tracker.metrics({"step": 2, "loss": 1.5, "val_loss": 0.75, "finished": True, "note": "text"})
        tracker.metrics({"step": 4, "loss": 1.25})
        tracker.artifact("samples/step_4.png", b"not really a png")
        tracker.close()
    client = MlflowClient(tracking_uri=f"file://{tmp_path}/my-run/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("my-run").experiment_id])
    assert [r.info.run_name for r in runs] == ["prior"] and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(2, 1.5), (4, 1.25)]
    assert set(runs[0].data.metrics) == {"loss", "val_loss"}  # numbers only
    assert runs[0].data.params["batch_size"] == "7" and runs[0].data.tags["dalle2.job"] == "prior"
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.yaml", "samples"]
    events = list((tmp_path / "my-run" / "train" / "prior" / "tensorboard").iterdir())
    assert len(events) == 1  # rank 0's alone

    # a restart continues the job's run (its curve goes on); a job that fails ends it FAILED
    again = Tracker(run, run.train_prior, 0)
    again.metrics({"step": 6, "loss": 1.0})
    again.close(failed=True)
    runs = client.search_runs([client.get_experiment_by_name("my-run").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4, 6]


def test_mlflows_default_store_needs_a_local_root():
    from jobs.run_config import RunConfig

    with pytest.raises(ValidationError, match="tracking.mlflow_tracking_uri"):
        RunConfig(root="s3://bucket/run", tracking={"mlflow": True})
    RunConfig(root="s3://bucket/run", tracking={"mlflow": True, "mlflow_tracking_uri": "http://127.0.0.1:5000"})


def test_rank_zero_logs_to_an_offline_wandb_run_that_a_restart_continues(tmp_path, monkeypatch):
    import os

    import yaml

    from tests.wandb_records import history, records

    from jobs.run_config import RunConfig
    from jobs.training.tracking import Tracker

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunConfig(root=str(tmp_path / "my-run"), tracking={"wandb": True}, train_prior={"batch_size": 7})
    for rank in (1, 0):
        tracker = Tracker(run, run.train_prior, rank)
        tracker.metrics({"step": 2, "loss": 1.5, "val_loss": 0.75, "note": "text"})
        tracker.metrics({"step": 4, "loss": 1.25})
        tracker.artifact("samples/step_4.png", _png(), step=4)
        tracker.close()
    assert "WANDB_MODE" not in os.environ  # offline for the run, not for the process
    job = tmp_path / "my-run" / "train" / "prior"
    run_id = json.loads((job / "wandb_run.json").read_text())["run_id"]
    offline = list((job / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and (offline[0] / f"run-{run_id}.wandb").exists()  # rank 0's run alone
    files = offline[0] / "files"
    rows = history(str(offline[0] / f"run-{run_id}.wandb"))
    assert [(row["_step"], row["loss"]) for row in rows] == [(2, 1.5), (4, 1.25)] and rows[0]["val_loss"] == 0.75
    assert "note" not in rows[0] and rows[1]["samples/_type"] == "image-file"  # numbers, and the grid as an image
    assert (files / "samples" / "step_4.png").read_bytes() == _png()
    assert yaml.safe_load((files / "run.yaml").read_text())["train_prior"]["batch_size"] == 7
    # a restart continues the same run id (wandb sync then appends to one run); a failed job exits non-zero
    again = Tracker(run, run.train_prior, 0)
    again.metrics({"step": 6, "loss": 1.0})
    again.close(failed=True)
    runs = sorted((job / "wandb").glob("offline-run-*"))
    assert [[f.name for f in folder.glob("run-*.wandb")] for folder in runs] == [[f"run-{run_id}.wandb"]] * 2
    last = [r for r in records(str(runs[-1] / f"run-{run_id}.wandb")) if r.WhichOneof("record_type") == "exit"]
    assert [r.exit.exit_code for r in last] == [1]


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(out, format="PNG")
    return out.getvalue()
