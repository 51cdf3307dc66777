"""The training loop's schedule (jobs/training/cadence.py): when it logs, evaluates, checkpoints, stops and where a
checkpoint resumes, with gradient accumulation and at the end of a run."""

from __future__ import annotations

from jobs.training.cadence import Cadence


def schedule(cadence: Cadence, batches_per_epoch: int, accumulate: int = 1) -> list[tuple]:
    """What the loop does batch by batch (an optimizer step every `accumulate` batches), as the loop drives it."""
    done, step, epoch = [], 0, 0
    while not cadence.done(epoch, step):
        for position in range(1, batches_per_epoch + 1):
            stepped = position % accumulate == 0 or position == batches_per_epoch
            step += stepped
            end = position == batches_per_epoch
            actions = cadence.after_batch(step=step, stepped=stepped, epoch=epoch, end_of_epoch=end)
            if actions is not None:
                done.append((epoch, position, step, actions.log, actions.evaluate, actions.checkpoint,
                             actions.finished, cadence.resume_point(epoch=epoch, position=position, end_of_epoch=end)))
            if actions is not None and actions.finished:
                break
        epoch += 1
    return done


def test_every_interval_fires_on_its_multiples_and_the_last_step_does_everything():
    cadence = Cadence(epochs=1, max_steps=None, eval_every=3, checkpoint_every=4, log_every=2)
    steps = schedule(cadence, batches_per_epoch=7)
    assert [s[2] for s in steps] == [1, 2, 3, 4, 5, 6, 7]
    assert [s[2] for s in steps if s[3]] == [2, 4, 6, 7]  # logged
    assert [s[2] for s in steps if s[4]] == [3, 6, 7]  # evaluated
    assert [s[2] for s in steps if s[5]] == [4, 7]  # checkpointed
    assert [s[2] for s in steps if s[6]] == [7]  # finished: the run's summary has an evaluation and a checkpoint


def test_max_steps_stops_mid_epoch_and_the_checkpoint_resumes_at_the_next_batch():
    cadence = Cadence(epochs=5, max_steps=5, eval_every=100, checkpoint_every=100, log_every=100)
    steps = schedule(cadence, batches_per_epoch=3)
    last = steps[-1]
    assert (last[0], last[1], last[2]) == (1, 2, 5) and last[4] and last[5] and last[6]
    assert last[7] == {"epoch": 1, "batch": 2}  # the next batch of the same epoch
    assert cadence.done(epoch=1, step=5) and not cadence.done(epoch=1, step=4)


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_at_the_next_epochs_first_batch():
    cadence = Cadence(epochs=3, max_steps=None, eval_every=100, checkpoint_every=4, log_every=100)
    steps = schedule(cadence, batches_per_epoch=4)
    assert [(s[0], s[7]) for s in steps if s[5]] == [(0, {"epoch": 1, "batch": 0}), (1, {"epoch": 2, "batch": 0}),
                                                     (2, {"epoch": 3, "batch": 0})]
    assert steps[-1][6] and cadence.done(epoch=3, step=12)


def test_max_steps_stops_where_no_part_holds_accumulated_gradients():
    cadence = Cadence(epochs=5, max_steps=3, eval_every=100, checkpoint_every=100, log_every=100)
    assert cadence.after_batch(step=3, stepped=False, epoch=0, end_of_epoch=False, since=2, clean=False) is None
    done = cadence.after_batch(step=4, stepped=True, epoch=0, end_of_epoch=False, since=2, clean=True)
    assert done.finished and done.checkpoint and done.evaluate


def test_nothing_happens_between_the_micro_batches_of_an_accumulated_step():
    cadence = Cadence(epochs=1, max_steps=None, eval_every=1, checkpoint_every=1, log_every=1)
    steps = schedule(cadence, batches_per_epoch=7, accumulate=3)
    # optimizer steps complete on batches 3 and 6, and the epoch's last (7) steps with what it has
    assert [(s[1], s[2]) for s in steps] == [(3, 1), (6, 2), (7, 3)]
    assert cadence.after_batch(step=1, stepped=False, epoch=0, end_of_epoch=False) is None
    # a run's last batch finishes it even when it completes no step
    assert cadence.after_batch(step=2, stepped=False, epoch=0, end_of_epoch=True).finished


def test_a_checkpoint_mid_epoch_resumes_on_the_same_or_another_number_of_workers():
    # 3 batches on 2 workers, then 4 on 1: the checkpoint keeps both segments of the epoch
    point = Cadence.resume_point(epoch=2, position=7, end_of_epoch=False, earlier=[(2, 3)], world_size=1)
    assert point == {"epoch": 2, "batch": 7, "segments": [[2, 3], [1, 4]]}
    assert Cadence.resumed_at(point, world_size=1) == (2, [(2, 3)], 4)  # the same workers: skip its 4 batches
    assert Cadence.resumed_at(point, world_size=4) == (2, [(2, 3), (1, 4)], 0)  # others: a share of the rest
    assert Cadence.resumed_at({"epoch": 1, "batch": 5}, world_size=3) == (1, [], 5)  # saved without segments
    end = Cadence.resume_point(epoch=2, position=9, end_of_epoch=True, earlier=[(2, 3)], world_size=1)
    assert end == {"epoch": 3, "batch": 0} and Cadence.resumed_at(end, world_size=2) == (3, [], 0)


class FakeWorker:
    """The per-worker side the loop talks to, recording what it reports (rank 0 of 1, no Ray)."""

    def __init__(self, root: str):
        self.rank, self.world_size, self.root, self.job_name = 0, 1, root, "decoder"
        self.reports = []
        self.tracker = type("Tracker", (), {"metrics": lambda self, m: None, "close": lambda self, failed=False: None})()

    def report(self, metrics: dict, save=None) -> None:
        self.reports.append((dict(metrics), save is not None))
        if save is not None:
            save(self.root)


class ListLoader:
    def __init__(self, batches: list):
        self.batches = batches

    def batches_per_epoch(self, earlier=(), epoch=0) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, skip_batches: int = 0, earlier=()):
        yield from self.batches[skip_batches:]


def test_unets_trained_in_turn_with_accumulation_checkpoint_only_when_none_holds_gradients(tmp_path):
    # 2 unets in turn, 2 micro-batches a step: unet 1 steps on batch 3 while unet 2 still holds batch 2's gradients
    import torch

    from dalle2 import Decoder, DecoderTrainer
    from jobs.training.config import TrainDecoderConfig
    from jobs.training.loop import training_loop

    torch.manual_seed(0)
    unet = dict(dim=8, dim_mults=(1,), image_embed_dim=8, cond_dim=8, attn_heads=1, attn_dim_head=8, groups=4)
    decoder = Decoder(unets=[unet, {**unet, "lowres_cond": True}], image_sizes=(8, 16), timesteps=10)
    trainer = DecoderTrainer(decoder, grad_accum_every=2)
    batches = [{"image": torch.rand(2, 3, 16, 16), "image_embed": torch.randn(2, 8)} for _ in range(12)]
    counter = [0]
    pending_at_save = []

    def train_step(batch):
        number = counter[0] % 2 + 1
        counter[0] += 1
        return trainer.train_step(batch, unet_number=number)

    trainer.save = lambda folder, extra=None: pending_at_save.append((list(trainer._pending), extra))
    job = TrainDecoderConfig(workers=1, epochs=1, checkpoint_every=3, eval_every=100, log_every=100)
    worker = FakeWorker(str(tmp_path))
    training_loop(worker, job, trainer, ListLoader(batches), train_step, lambda step: {}, {})
    checkpoints = [metrics["step"] for metrics, saved in worker.reports if saved]
    # optimizer steps 1..6 (summed over the unets); clean points every 4th batch: steps 2, 4, 6; the interval of 3
    # fires at the first clean point past each multiple
    assert checkpoints == [4, 6] and trainer.steps == [3, 3]
    # no gradient left behind in a checkpoint: each resumes after a batch where both unets had just stepped
    assert [(pending, extra["batch"]) for pending, extra in pending_at_save] == [([0, 0], 8), ([0, 0], 0)]
    assert pending_at_save[1][1]["epoch"] == 1  # the last one: the next epoch's start
