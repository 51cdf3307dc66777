"""The diffusion prior, its trainer and its metrics."""

import pytest
import torch

from dalle2.parallel import whole

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


def test_bf16_autocast_on_cpu_and_fp16_is_refused(caplog):
    from dalle2.precision import _warn_float32, autocast_context, cpu_has_native

    _warn_float32.cache_clear()  # warned once a process: maybe by an earlier test
    weights = torch.randn(DIM, DIM)
    batch = dict(zip(("text_embed", "image_embed"), toy_pairs(weights, 8)))
    assert PriorTrainer(small_prior(), amp="bf16").train_step(batch) > 0
    with pytest.raises(ValueError, match="fp16"):
        PriorTrainer(small_prior(), amp="fp16")
    # bf16 where the CPU computes it natively; float32 and a warning where torch would fall back to a reference
    # matmul about 100 times slower (a cluster config's `amp: bf16` run on a CPU once took minutes a step)
    x = torch.randn(4, 4)
    with autocast_context("cpu", "bf16"):
        product = x @ x
    assert product.dtype == (torch.bfloat16 if cpu_has_native("bf16") else torch.float32)
    assert ("no native bf16" in caplog.text) != cpu_has_native("bf16")
    with autocast_context("cpu", "none"):
        assert (x @ x).dtype == torch.float32


def captured_gradients(trainer):
    """Record the gradients the optimizer sees at each step."""
    seen = []
    optimizer = trainer.optimizers[0]
    step = optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.clone() if p.grad is not None else None for p in trainer.model.parameters()])
        return step(*args, **kwargs)

    optimizer.step = recording_step
    return seen


def test_accumulating_unequal_micro_batches_gives_the_full_batch_gradient():
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model.config = None
    full = RegressionTrainer(model, [model], lr=0.1, max_grad_norm=None)
    full_grads = captured_gradients(full)
    full.train_step({"x": x, "y": y})
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model.config = None
    accumulated = RegressionTrainer(model, [model], lr=0.1, max_grad_norm=None, grad_accum_every=2)
    accumulated_grads = captured_gradients(accumulated)
    accumulated.train_step({"x": x[:7], "y": y[:7]})  # 7 rows, then 1: each row counts once, not each batch
    accumulated.train_step({"x": x[7:], "y": y[7:]})
    for a, b in zip(full_grads[0], accumulated_grads[0]):
        torch.testing.assert_close(a, b)


class FrozenMemberModel(torch.nn.Module):
    """A trained linear layer next to a frozen member with dropout (as a CLIP inside the prior)."""

    def __init__(self):
        super().__init__()
        self.trained = torch.nn.Linear(4, 2)
        self.unused = torch.nn.Linear(4, 2)  # never in the loss: no gradient, never decayed
        self.frozen = torch.nn.Dropout(0.5)
        self.frozen.eval()
        self.config = None

    def forward(self, x):
        return self.trained(self.frozen(x))


class FrozenMemberTrainer(DiffusionTrainer):
    def compute_loss(self, batch, part):
        return self.model(batch["x"]).pow(2).mean()


def test_training_leaves_frozen_members_in_eval_mode():
    model = FrozenMemberModel()
    trainer = FrozenMemberTrainer(model, [model.trained], lr=0.1)
    trainer.train_step({"x": torch.randn(4, 4)})
    assert model.trained.training and not model.frozen.training
    with trainer.ema_weights():
        assert not model.trained.training
    assert model.trained.training and not model.frozen.training


def test_resuming_uses_the_configs_lr_and_restores_ema_from_the_weights_without_an_ema_file(tmp_path):
    import os

    from dalle2.checkpoint import EMA_FILE

    weights = torch.randn(DIM, DIM)
    batch = dict(zip(("text_embed", "image_embed"), toy_pairs(weights, 8)))
    trainer = PriorTrainer(small_prior(), lr=1e-3, warmup_steps=10)
    for _ in range(3):
        trainer.train_step(batch)
    trainer.save(str(tmp_path / "ckpt"))

    resumed = PriorTrainer(small_prior(), lr=4e-4, warmup_steps=10)
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(4e-4 * 4 / 10)  # step 3 of a 10-step warmup
    resumed.train_step(batch)
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(4e-4 * 5 / 10)

    os.remove(tmp_path / "ckpt" / EMA_FILE)
    from dalle2.checkpoint import mark_complete

    mark_complete(str(tmp_path / "ckpt"))  # a checkpoint saved without EMA weights: its marker lists none
    no_ema = PriorTrainer(small_prior(), lr=1e-3)
    no_ema.load(str(tmp_path / "ckpt"))
    live = no_ema.model.net.state_dict()
    for key, value in no_ema.emas[0].shadow.items():
        torch.testing.assert_close(value, live[key])  # not the fresh random weights the EMA was built from


def test_causal_attention_stays_causal_with_a_key_mask():
    from dalle2.layers import Attention

    torch.manual_seed(0)
    attention = Attention(dim=8, heads=2, dim_head=4)
    x = torch.randn(1, 5, 8)
    mask = torch.tensor([[True, True, False, True, True]])
    out = attention(x, mask=mask, causal=True)
    changed = x.clone()
    changed[:, 4] += 1.0  # the last token may not affect any earlier position
    torch.testing.assert_close(attention(changed, mask=mask, causal=True)[:, :4], out[:, :4])
    masked = x.clone()
    masked[:, 2] += 1.0  # a masked key affects nobody
    torch.testing.assert_close(attention(masked, mask=mask, causal=True)[:, [0, 1, 3, 4]], out[:, [0, 1, 3, 4]])


@pytest.mark.parametrize("text_len", [0, 6])
def test_the_last_block_computing_only_the_final_token_changes_no_output_or_gradient(text_len):
    torch.manual_seed(0)
    net = DiffusionPriorNetwork(dim=64, depth=3, heads=4, dim_head=16, embed_dim=DIM, max_text_len=8)
    inputs = dict(image_embed=torch.randn(5, DIM), t=torch.randint(0, 100, (5,)), text_embed=torch.randn(5, DIM),
                  cond_drop_mask=torch.tensor([False, True, False, False, True]))
    if text_len:
        inputs.update(text_encodings=torch.randn(5, text_len, DIM),
                      text_mask=torch.arange(text_len)[None] < torch.tensor([6, 3, 1, 6, 4])[:, None])

    full = net(**inputs)
    # the reference: the network's own token sequence, every token through every block, the final one read
    tokens = {}
    hook = net.blocks[0].register_forward_pre_hook(lambda module, args: tokens.setdefault("x", args[0]))
    net(**inputs)
    hook.remove()
    x = tokens["x"]
    for block in net.blocks:
        x = block(x)
    reference = net.to_out(net.norm(x[:, -1]))
    torch.testing.assert_close(full, reference, rtol=1e-5, atol=1e-5)

    grads = torch.autograd.grad(full.square().sum(), list(net.parameters()), allow_unused=True)
    reference_grads = torch.autograd.grad(reference.square().sum(), list(net.parameters()), allow_unused=True)
    for (name, _), grad, expected in zip(net.named_parameters(), grads, reference_grads):
        if expected is None:
            assert grad is None, name
        else:
            scale = expected.abs().max().item()  # float32 sums in another order: close against the gradient's size
            torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


class UnusedParameterTrainer(DiffusionTrainer):
    def compute_loss(self, batch, part):
        return self.model(batch["x"]).pow(2).mean()  # through forward(): where a sharded model is gathered


def _two_rank_step(rank: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    # a file rendezvous: no port that another process could take between choosing it and binding it
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    for parallel in ("ddp", "fsdp"):  # replicated, then sharded
        torch.manual_seed(0)
        model = FrozenMemberModel()
        trainer = UnusedParameterTrainer(model, [model], lr=0.1, weight_decay=0.5, parallel=parallel)
        before = whole(model.unused.weight.detach().clone())
        trained_before = whole(model.trained.weight.detach().clone())
        trainer.train_step({"x": torch.randn(4, 4)})
        torch.save({"unused_changed": not torch.equal(before, whole(model.unused.weight.detach())),
                    "trained_changed": not torch.equal(trained_before, whole(model.trained.weight.detach()))},
                   f"{out}.{parallel}.{rank}")
        trainer.close()
    dist.destroy_process_group()


def test_a_parameter_no_rank_used_is_not_decayed_on_several_workers(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_two_rank_step, args=(str(tmp_path / "rendezvous"), out), nprocs=2)
    for name in (f"{parallel}.{rank}" for parallel in ("ddp", "fsdp") for rank in (0, 1)):
        result = torch.load(f"{out}.{name}", weights_only=True)
        assert not result["unused_changed"]  # as on one worker: AdamW skips a parameter without a gradient
        assert result["trained_changed"]


def test_best_of_n_keeps_the_candidate_closest_to_the_text():
    prior = small_prior(num_samples_per_batch=4).eval()
    text_embed = l2norm(torch.randn(3, DIM))
    candidates = l2norm(torch.randn(12, DIM))
    prior.diffusion.sample = lambda *args, **kwargs: candidates  # the candidates the sampler would draw
    chosen = prior.sample(text_embed=text_embed)
    expected = torch.stack([
        max(candidates[4 * i:4 * i + 4], key=lambda c: float(c @ text_embed[i])) for i in range(3)])
    torch.testing.assert_close(chosen, expected)


def test_r_precision_clip_score_and_cmmd_tell_matching_from_unrelated():
    from dalle2.metrics import clip_score, cmmd, r_precision

    torch.manual_seed(0)
    prompts = l2norm(torch.randn(6, DIM))
    index = torch.arange(24) // 4
    matching = l2norm(prompts[index] + 0.05 * torch.randn(24, DIM))
    unrelated = l2norm(torch.randn(24, DIM))
    assert r_precision(matching, prompts, index) == 1.0
    assert r_precision(unrelated, prompts, index) < 0.5  # chance is 1/6
    assert r_precision(matching, prompts, (index + 1) % 6) == 0.0  # scored against the wrong prompts
    assert clip_score(matching, prompts[index]) > 80 > 20 > clip_score(unrelated, prompts[index])
    same_a, same_b = l2norm(torch.randn(200, DIM)), l2norm(torch.randn(200, DIM))
    shifted = l2norm(torch.randn(200, DIM) + 2.0)
    assert 0 <= cmmd(same_a, same_b) < 0.2 * cmmd(same_a, shifted)
    assert cmmd(same_a, same_a) == pytest.approx(0, abs=1e-4)


def test_the_prior_network_attends_causally_inside_its_blocks():
    # a token never sees the tokens after it: the noised image and the query may not change what the blocks make
    # of the text and time tokens before them (only the final token, read at the end, sees everything)
    from dalle2.prior import DiffusionPriorNetwork

    torch.manual_seed(0)
    net = DiffusionPriorNetwork(dim=16, depth=3, heads=2, dim_head=8, embed_dim=8).eval()
    seen: list[torch.Tensor] = []
    hook = net.blocks[1].register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    text, t = torch.randn(2, 8), torch.tensor([3, 7])
    net(torch.randn(2, 8), t, text)
    net(torch.randn(2, 8), t, text)  # another noised image: tokens 0-1 (text, time) must not notice
    net(torch.randn(2, 8), t, torch.randn(2, 8))  # another text: every later token does
    hook.remove()
    torch.testing.assert_close(seen[1][:, :2], seen[0][:, :2])
    assert (seen[1][:, 2:] - seen[0][:, 2:]).abs().amax() > 1e-3
    assert (seen[2][:, 1:] - seen[0][:, 1:]).abs().amax() > 1e-3
