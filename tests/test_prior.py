"""The diffusion prior, its trainer and its metrics."""

import pytest
import torch

from dalle2 import DiffusionPrior, DiffusionPriorNetwork, PriorTrainer
from dalle2.trainer import DiffusionTrainer
from dalle2.checkpoint import ConfigMismatchError
from dalle2.layers import l2norm
from dalle2.metrics import prior_metrics

DIM = 32


def toy_pairs(weights, n, generator=None):
    """A fixed linear map of unit text embeds: image_embed = normalize(W @ text_embed)."""
    text_embed = l2norm(torch.randn(n, DIM, generator=generator))
    return text_embed, l2norm(text_embed @ weights.T)


def small_prior(**kwargs):
    net = DiffusionPriorNetwork(dim=128, depth=2, heads=4, dim_head=32, embed_dim=DIM)
    return DiffusionPrior(net=net, timesteps=100, sample_timesteps=20, cond_drop_prob=0.1, **kwargs)


def test_prior_learns_a_toy_mapping():
    torch.manual_seed(0)
    weights = torch.randn(DIM, DIM)
    trainer = PriorTrainer(small_prior(), lr=1e-3, warmup_steps=50, ema_beta=0.99)
    held_out_text, held_out_image = toy_pairs(weights, 128, torch.Generator().manual_seed(1))
    before = prior_metrics(trainer.sample, held_out_text, held_out_image)
    losses = []
    for _ in range(400):  # about 15 s on one CPU thread; the budget is 2 minutes
        text_embed, image_embed = toy_pairs(weights, 128)
        losses.append(trainer.train_step({"text_embed": text_embed, "image_embed": image_embed}))
    after = prior_metrics(trainer.sample, held_out_text, held_out_image)
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    assert after["image_similarity"] >= 0.9, after
    assert before["image_similarity"] < 0.5
    assert after["unrelated_similarity"] < after["image_similarity"] - 0.3
    assert after["baseline_similarity"] == pytest.approx((held_out_text * held_out_image).sum(-1).mean().item())


def test_checkpoint_round_trip_gives_identical_samples(tmp_path):
    torch.manual_seed(0)
    trainer = PriorTrainer(small_prior(), lr=1e-3)
    weights = torch.randn(DIM, DIM)
    for _ in range(3):
        text_embed, image_embed = toy_pairs(weights, 16)
        trainer.train_step({"text_embed": text_embed, "image_embed": image_embed})
    trainer.save(str(tmp_path / "ckpt"), extra={"epoch": 2, "position": 48})

    restored = PriorTrainer(small_prior(), lr=1e-3)
    extra = restored.load(str(tmp_path / "ckpt"))
    assert extra == {"epoch": 2, "position": 48} and restored.steps == trainer.steps == [3]
    text_embed, _ = toy_pairs(weights, 4)
    a = trainer.sample(text_embed=text_embed, generator=torch.Generator().manual_seed(7))
    b = restored.sample(text_embed=text_embed, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the optimizer state came back too: one more identical step keeps them identical
    batch = dict(zip(("text_embed", "image_embed"), toy_pairs(weights, 8)))
    torch.manual_seed(3)
    trainer.train_step(batch)
    torch.manual_seed(3)
    restored.train_step(batch)
    for p, q in zip(trainer.model.parameters(), restored.model.parameters()):
        torch.testing.assert_close(p, q)


def test_loading_a_mismatched_config_names_the_fields(tmp_path):
    PriorTrainer(small_prior()).save(str(tmp_path / "ckpt"))
    net = DiffusionPriorNetwork(dim=64, depth=3, heads=4, dim_head=16, embed_dim=DIM)
    other = PriorTrainer(DiffusionPrior(net=net, timesteps=100, sample_timesteps=20, cond_drop_prob=0.1))
    with pytest.raises(ConfigMismatchError) as error:
        other.load(str(tmp_path / "ckpt"))
    message = str(error.value)
    assert "net.dim: checkpoint 128, model 64" in message and "net.depth: checkpoint 2, model 3" in message


def test_cond_scale_one_equals_the_conditional_prediction():
    torch.manual_seed(0)
    prior = small_prior().eval()
    text_embed, x = torch.randn(3, DIM), torch.randn(3, DIM)
    t = torch.tensor([5, 50, 90])
    conditional = prior.net(x, t, text_embed)
    torch.testing.assert_close(prior.guided_model_fn(text_embed, None, None, 1.0)(x, t), conditional)
    null = prior.net(x, t, text_embed, cond_drop_mask=torch.ones(3, dtype=torch.bool))
    guided = prior.guided_model_fn(text_embed, None, None, 3.0)(x, t)
    torch.testing.assert_close(guided, null + 3.0 * (conditional - null), atol=1e-5, rtol=1e-4)


def test_trains_through_clip_with_text_encodings(tiny_clip):
    net = DiffusionPriorNetwork(dim=64, depth=2, heads=4, dim_head=16, embed_dim=tiny_clip.embed_dim)
    prior = DiffusionPrior(net=net, clip=tiny_clip, timesteps=50, condition_on_text_encodings=True)
    trainer = PriorTrainer(prior, lr=1e-3)
    loss = trainer.train_step({"text": ["a red square", "a blue circle"], "image": torch.rand(2, 3, 32, 32)})
    assert loss > 0 and all(p.grad is None for p in tiny_clip.parameters())
    samples = trainer.sample(text=["a red square"], cond_scale=2.0, sample_timesteps=5)
    assert samples.shape == (1, tiny_clip.embed_dim)
    torch.testing.assert_close(samples.norm(dim=-1), torch.ones(1))
    with pytest.raises(ValueError, match="text_encodings"):
        prior(text_embed=torch.randn(2, tiny_clip.embed_dim), image_embed=torch.randn(2, tiny_clip.embed_dim))


class RegressionTrainer(DiffusionTrainer):
    """A trainer over a plain linear regression: its loss is deterministic, so chunking must not change it."""

    def compute_loss(self, batch, part):
        return torch.nn.functional.mse_loss(self.model(batch["x"]), batch["y"])


def regression_run(batches, **config):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model.config = None
    trainer = RegressionTrainer(model, [model], lr=0.1, max_grad_norm=None, **config)
    for batch in batches:
        trainer.train_step(batch)
    return trainer


def test_max_batch_size_and_accumulation_match_a_full_batch():
    x, y = torch.randn(12, 4), torch.randn(12, 2)
    full = regression_run([{"x": x, "y": y}])
    chunked = regression_run([{"x": x, "y": y}], max_batch_size=5)
    accumulated = regression_run([{"x": x[:6], "y": y[:6]}, {"x": x[6:], "y": y[6:]}], grad_accum_every=2)
    assert full.steps == chunked.steps == accumulated.steps == [1]
    for other in (chunked, accumulated):
        for p, q in zip(full.model.parameters(), other.model.parameters()):
            torch.testing.assert_close(p, q)
    half = regression_run([{"x": x[:6], "y": y[:6]}], grad_accum_every=2)
    assert half.steps == [0]  # one of two micro-batches: no optimizer step yet
    torch.testing.assert_close(half.model.weight, regression_run([]).model.weight)


def test_bf16_autocast_on_cpu_and_fp16_is_refused():
    weights = torch.randn(DIM, DIM)
    batch = dict(zip(("text_embed", "image_embed"), toy_pairs(weights, 8)))
    assert PriorTrainer(small_prior(), amp="bf16").train_step(batch) > 0
    with pytest.raises(ValueError, match="fp16"):
        PriorTrainer(small_prior(), amp="fp16")
