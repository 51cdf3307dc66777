"""Data parallelism through torch: 2 gloo processes, as Ray Train's CPU workers run, train the prior and both unets
of a decoder to the parameters one process reaches on the same samples, replicated (DistributedDataParallel) or
sharded (FSDP2's fully_shard); their checkpoints resume on another number of processes."""

import pytest
import torch
import torch.multiprocessing as mp

from dalle2 import Decoder, DecoderTrainer, DiffusionPrior, DiffusionPriorNetwork, PriorTrainer
from dalle2.parallel import local, whole
from dalle2.row_random import sample_seeds

EMBED = 16
STEPS = 2
# a micro-batch: 4 rows on rank 0, 3 on rank 1, so a mean per rank would not be the mean over all rows; in chunks of
# 2 rows, 2 chunks on each (sharded ranks gather each block in every forward pass: they must make as many)
ROWS = 7


def models():
    torch.manual_seed(0)
    prior = DiffusionPrior(net=DiffusionPriorNetwork(dim=32, depth=2, heads=2, dim_head=16, embed_dim=EMBED),
                           timesteps=100)
    unet = dict(dim=16, dim_mults=(1, 2), image_embed_dim=EMBED, cond_dim=16, attn_heads=2, attn_dim_head=8, groups=4)
    decoder = Decoder(unets=[unet, {**unet, "lowres_cond": True}], image_sizes=(16, 32), timesteps=50,
                      random_crop_sizes=(None, 16))
    return prior, decoder


def micro_batches(step: int, rank: int, world: int):
    """The two micro-batches of optimizer step `step` (rows of one draw), this rank's every world-th row of each."""
    generator = torch.Generator().manual_seed(step)
    for micro in range(2):
        keys = [f"{step:02d}{micro}{row:03d}" for row in range(ROWS)]
        batch = dict(text_embed=torch.randn(ROWS, EMBED, generator=generator),
                     image_embed=torch.randn(ROWS, EMBED, generator=generator),
                     image=torch.rand(ROWS, 3, 32, 32, generator=generator), seeds=sample_seeds(keys, 0, 0))
        yield {k: v[rank::world] for k, v in batch.items()}


def count_syncs(trainer, counts: list) -> None:
    """Count each replica's gradient exchanges (its first bucket's all-reduce: one per synchronised backward)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    for index, replica in enumerate(trainer.replicas):
        def hook(state, bucket, index=index):
            counts[index] += bucket.index() == 0
            return allreduce_hook(state, bucket)

        replica.register_comm_hook(None, hook)


SETTINGS = dict(lr=1e-2, grad_accum_every=2, max_batch_size=2, ema_beta=0.5)


def trainers(parallel: str = "ddp"):
    prior, decoder = models()
    return (PriorTrainer(prior, **SETTINGS, parallel=parallel),
            DecoderTrainer(decoder, **SETTINGS, gradient_checkpointing=True, parallel=parallel))


def state_of(prior_trainer, decoder_trainer) -> dict:
    """Every weight, EMA weight and Adam moment of both trainers, whole (gathered from the shards: a collective)."""
    # Adam's step hardly depends on the gradients' scale; its moments do: a rank that averaged over its own rows
    # (or skipped the all-reduce) shows there
    moments = {f"{name}.{i}.{j}.{moment}": state[moment]
               for name, trainer in (("prior", prior_trainer), ("decoder", decoder_trainer))
               for i, optimizer in enumerate(trainer.optimizers) for j, state in enumerate(optimizer.state.values())
               for moment in ("exp_avg", "exp_avg_sq")}
    emas = {f"{name}.ema.{i}.{k}": v for name, trainer in (("prior", prior_trainer), ("decoder", decoder_trainer))
            for i, ema in enumerate(trainer.emas) for k, v in ema.shadow.items()}
    state = whole({**{f"prior.{k}": v for k, v in prior_trainer.model.state_dict().items()},
                   **{f"decoder.{k}": v for k, v in decoder_trainer.model.state_dict().items()}, **moments, **emas,
                   "steps": torch.tensor(prior_trainer.steps + decoder_trainer.steps)})
    return {k: v.detach().clone() for k, v in state.items()}  # not the live tensors training goes on changing


def optimizer_step(prior_trainer, decoder_trainer, step: int, rank: int, world: int) -> None:
    """Optimizer step `step` of the prior and of each unet: 2 micro-batches, this rank's rows of each."""
    for batch in micro_batches(step, rank, world):
        prior_trainer.train_step({k: batch[k] for k in ("text_embed", "image_embed", "seeds")})
        for number in (1, 2):
            decoder_trainer.train_step({k: batch[k] for k in ("image", "image_embed", "seeds")}, unet_number=number)


def train(rank: int = 0, world: int = 1, parallel: str = "ddp", checkpoint: str = None) -> dict:
    """STEPS optimizer steps of the prior and of each unet (2 micro-batches each, split into chunks of 2 rows); the
    decoder's unets recompute their activations in the backward pass. Saved to `checkpoint`/{prior,decoder}."""
    prior_trainer, decoder_trainer = trainers(parallel)
    if parallel == "fsdp" and world > 1:  # each rank holds about half of every part's parameters
        for part in prior_trainer.parts + decoder_trainer.parts:
            held = sum(local(p).numel() for p in part.parameters())
            assert 0.4 < held / sum(p.numel() for p in part.parameters()) < 0.6
    syncs = {"prior": [0], "decoder": [0, 0]}
    if world > 1 and parallel == "ddp":
        count_syncs(prior_trainer, syncs["prior"])
        count_syncs(decoder_trainer, syncs["decoder"])
    for step in range(STEPS):
        optimizer_step(prior_trainer, decoder_trainer, step, rank, world)
    assert prior_trainer.steps == [STEPS] and decoder_trainer.steps == [STEPS, STEPS]
    if world > 1 and parallel == "ddp":  # once per optimizer step, not once per micro-batch or chunk
        assert syncs == {"prior": [STEPS], "decoder": [STEPS, STEPS]}, syncs
    if checkpoint:
        prior_trainer.save(f"{checkpoint}/prior")
        decoder_trainer.save(f"{checkpoint}/decoder")
    result = state_of(prior_trainer, decoder_trainer)
    prior_trainer.close()
    decoder_trainer.close()
    return result


def samples(prior_trainer, decoder_trainer, rank: int) -> dict:
    """Rank 0 samples 2 rows of each model inside an evaluation, rank 1 none: a sharded model needs no
    communication there, whatever each rank samples."""
    generator = torch.Generator().manual_seed(1)
    text_embed, image_embed = torch.randn(2, EMBED, generator=generator), torch.randn(2, EMBED, generator=generator)
    with prior_trainer.evaluating(), decoder_trainer.evaluating():
        if rank != 0:
            return {}
        return {"sample.prior": prior_trainer.sample(text_embed=text_embed, generator=generator),
                "sample.decoder": decoder_trainer.sample(image_embed=image_embed, generator=generator)}


def resumed(checkpoint: str, parallel: str = "ddp", rank: int = 0, world: int = 1) -> dict:
    """Fresh trainers loaded from `checkpoint` (saved by `train`): their state whole, rank 0's samples, and their
    state after one more optimizer step (`next.*`)."""
    prior_trainer, decoder_trainer = trainers(parallel)
    prior_trainer.load(f"{checkpoint}/prior")
    decoder_trainer.load(f"{checkpoint}/decoder")
    result = {**state_of(prior_trainer, decoder_trainer), **samples(prior_trainer, decoder_trainer, rank)}
    optimizer_step(prior_trainer, decoder_trainer, STEPS, rank, world)
    result.update({f"next.{k}": v for k, v in state_of(prior_trainer, decoder_trainer).items()})
    prior_trainer.close()
    decoder_trainer.close()
    return result


def _rank(rank: int, rendezvous: str, out: str, parallel: str, saved_by_one: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.save(train(rank, 2, parallel, checkpoint=f"{out}.checkpoint"), f"{out}.{rank}")
        torch.save(resumed(saved_by_one, parallel, rank, 2), f"{out}.resumed.{rank}")  # 1 worker's checkpoint on 2
    finally:
        dist.destroy_process_group()


def assert_same_training(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 sums in another order, which Adam's division by a tiny second moment can enlarge: within a
    # hundredth of one step (lr 1e-2) for weights, a thousandth of the largest entry for the moments
    moment = name.rsplit(".", 1)[-1].startswith("exp_avg")
    tolerance = 1e-3 * expected.abs().max().item() if moment else 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=tolerance, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """One worker's training (checkpointed), and that checkpoint resumed on one worker: the reference."""
    folder = tmp_path_factory.mktemp("one-worker")
    one = train(checkpoint=str(folder / "one"))
    return str(folder / "one"), one, resumed(str(folder / "one"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_workers_train_the_parameters_one_worker_trains_and_resume_on_one(tmp_path, parallel, one_worker):
    saved_by_one, one, on_one_of_one = one_worker
    out = str(tmp_path / "params")
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), out, parallel, saved_by_one), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]
    start = {f"prior.{k}": v for k, v in models()[0].state_dict().items()}
    moved = [k for k, v in start.items() if not torch.equal(v, one[k])]
    assert len(moved) > 10, "one worker's training changed nothing"
    # the same parameters have optimizer state (a parameter no batch reaches has none, on 1 worker or 2)
    assert set(ranks[0]) == set(ranks[1]) == set(one) and sum(".exp_avg" in name for name in one) > 800
    for name, value in one.items():
        assert_same_training(name, ranks[0][name], value)
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks hold one model
    # the 2 workers' checkpoint resumes on 1 with their weights, EMA, moments and steps; 1 worker's on 2 alike
    on_one = resumed(f"{out}.checkpoint")
    on_two = [torch.load(f"{out}.resumed.{rank}", weights_only=True) for rank in (0, 1)]
    for name, value in ranks[0].items():
        assert torch.equal(on_one[name], value), name
    for name, value in one.items():
        assert torch.equal(on_two[0][name], value) and torch.equal(on_two[1][name], value), name
    # and train on from there as one worker does (Adam's moments, cut to the shards, carry on)
    following = [name for name in on_one_of_one if name.startswith("next.")]
    assert len(following) == len(one) and on_one_of_one["next.steps"].tolist() == [STEPS + 1] * 3
    for name in following:
        assert_same_training(name, on_two[0][name], on_one_of_one[name])
        assert_same_training(name, on_one[name], on_one_of_one[name])
    # the same EMA weights sample alike, gathered on 2 workers or on 1 (float32 sums in another order)
    assert set(on_two[0]) - set(on_two[1]) == {"sample.prior", "sample.decoder"}
    for name in ("sample.prior", "sample.decoder"):
        assert on_two[0][name].shape[0] == 2 and on_two[0][name].std() > 0.05
        torch.testing.assert_close(on_two[0][name], on_one_of_one[name], rtol=1e-3, atol=1e-3)
