"""Data parallelism through torch's DistributedDataParallel: 2 gloo processes, as Ray Train's CPU workers run, train
the prior and both unets of a decoder to the parameters one process reaches on the same samples."""

import torch
import torch.multiprocessing as mp

from dalle2 import Decoder, DecoderTrainer, DiffusionPrior, DiffusionPriorNetwork, PriorTrainer
from dalle2.row_random import sample_seeds

EMBED = 16
STEPS = 3
ROWS = 5  # a micro-batch: 3 rows on rank 0, 2 on rank 1, so a mean per rank would not be the mean over all rows


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


def train(rank: int = 0, world: int = 1) -> dict:
    """STEPS optimizer steps of the prior and of each unet (2 micro-batches each, split into chunks of 2 rows); the
    decoder's unets recompute their activations in the backward pass."""
    prior, decoder = models()
    settings = dict(lr=1e-2, grad_accum_every=2, max_batch_size=2, ema_beta=0.5)
    prior_trainer = PriorTrainer(prior, **settings)
    decoder_trainer = DecoderTrainer(decoder, **settings, gradient_checkpointing=True)
    syncs = {"prior": [0], "decoder": [0, 0]}
    if world > 1:
        count_syncs(prior_trainer, syncs["prior"])
        count_syncs(decoder_trainer, syncs["decoder"])
    for step in range(STEPS):
        for batch in micro_batches(step, rank, world):
            prior_trainer.train_step({k: batch[k] for k in ("text_embed", "image_embed", "seeds")})
            for number in (1, 2):
                decoder_trainer.train_step({k: batch[k] for k in ("image", "image_embed", "seeds")}, unet_number=number)
    assert prior_trainer.steps == [STEPS] and decoder_trainer.steps == [STEPS, STEPS]
    if world > 1:  # once per optimizer step, not once per micro-batch or chunk
        assert syncs == {"prior": [STEPS], "decoder": [STEPS, STEPS]}, syncs
    prior_trainer.close()
    decoder_trainer.close()
    # Adam's step hardly depends on the gradients' scale; its moments do: a rank that averaged over its own rows
    # (or skipped the all-reduce) shows there
    moments = {f"{name}.{i}.{j}.{moment}": state[moment]
               for name, trainer in (("prior", prior_trainer), ("decoder", decoder_trainer))
               for i, optimizer in enumerate(trainer.optimizers) for j, state in enumerate(optimizer.state.values())
               for moment in ("exp_avg", "exp_avg_sq")}
    return {**{f"prior.{k}": v for k, v in prior.state_dict().items()},
            **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}, **moments}


def _rank(rank: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.save(train(rank, 2), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_train_the_parameters_one_worker_trains_on_the_same_samples(tmp_path):
    out = str(tmp_path / "params")
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), out), nprocs=2)
    one = train()
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]
    start = {f"prior.{k}": v for k, v in models()[0].state_dict().items()}
    moved = [k for k, v in start.items() if not torch.equal(v, one[k])]
    assert len(moved) > 10, "one worker's training changed nothing"
    # the same parameters have optimizer state (a parameter no batch reaches has none, on 1 worker or 2)
    assert set(ranks[0]) == set(ranks[1]) == set(one) and sum(".exp_avg" in name for name in one) > 800
    for name, value in one.items():
        # float32 sums in another order, which Adam's division by a tiny second moment can enlarge: within a
        # hundredth of one step (lr 1e-2) for weights, a thousandth of the largest entry for the moments
        moment = name.rsplit(".", 1)[-1].startswith("exp_avg")
        tolerance = 1e-3 * value.abs().max().item() if moment else 1e-4
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-3, atol=tolerance, msg=lambda m: f"{name}: {m}")
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks hold one model
