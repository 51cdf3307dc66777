"""Train an open_clip model contrastively on the run's shards (no pretrained CLIP needed).

    python -m jobs.train_clip --config run.yaml [--set train_clip.model_name=tiny-clip]

Its checkpoints are ClipAdapter checkpoints: the embed stage, the prior and the decoder load the
latest one (see jobs/checkpoints.py).
"""

from __future__ import annotations

from typing import Optional

from .run_config import RunConfig
from .stage import Stage, training_complete
from .training.driver import train
from .training.loop import training_loop
from .training.rows import planned_steps, training_plans
from .training.worker import Worker, rank_slice, unslice


def clip_loop(config: dict) -> None:
    """One Ray Train worker: contrastive steps on this rank's images and captions."""
    import random

    import torch

    from dalle2.clip import ClipAdapter
    from dalle2.clip_trainer import ClipTrainer, info_nce, swapped_caption
    from pipeline.loaders.batches import ShardImageBatches

    run = RunConfig.model_validate(config)
    job = run.train_clip
    worker = Worker(run, job)
    torch.manual_seed(job.seed)
    clip = ClipAdapter(job.model_name)
    train_plan, eval_plan = training_plans(run, "train_clip")  # never the held-out rows; evaluated on them
    loader = ShardImageBatches(run.root, train_plan, job.batch_size, worker.rank, worker.world_size, job.seed,
                               job.shuffle_buffer, image_size=clip.image_size, drop_last=True)
    trainer = ClipTrainer(clip, job.trainer, device=worker.device, hard_negatives=job.hard_negatives, seed=job.seed,
                          planned_steps=planned_steps(job, loader))
    state = worker.resume(trainer.load)
    held_out = None if not eval_plan.size else next(
        ShardImageBatches(run.root, eval_plan, eval_plan.size, shuffle_buffer=1, image_size=clip.image_size).epoch(0))

    def train_step(batch: dict) -> float:
        return trainer.train_step({"image": batch["image"], "caption": batch["caption"]})

    # each rank embeds its share, gathered after (no held-out rows: no evaluation, on every rank alike)
    mine = rank_slice(held_out, worker.rank, worker.world_size) if held_out is not None else None

    def evaluate(step: int) -> dict:
        if mine is None:
            return {}
        clip.model.eval()
        with torch.no_grad():
            mine_features = (clip.embed_image(mine["image"]).cpu(), clip.embed_text(mine["caption"]).text_embed.cpu())
            parts = worker.gathered(mine_features if len(mine["caption"]) else None)
            image = unslice([part[0] if part else None for part in parts])
            text = unslice([part[1] if part else None for part in parts])
            # zero-shot retrieval: does each image pick its own caption among the held-out ones?
            captions = held_out["caption"]
            best = (image @ text.T).argmax(dim=1).tolist()
            accuracy = sum(captions[b] == c for b, c in zip(best, captions)) / len(captions)
            loss = float(info_nce(image, text, captions, clip.model.logit_scale.cpu()))
            # compositional: does each image prefer its caption to that caption's words swapped (same seed each time)?
            swapped = [swapped_caption(c, random.Random(i)) for i, c in enumerate(captions)]
            pairs = [(i, s) for i, s in enumerate(swapped) if s is not None]
            if pairs:
                negative = clip.embed_text([s for _, s in pairs]).text_embed.cpu()
                rows = [i for i, _ in pairs]
                wins = (image[rows] * text[rows]).sum(-1) > (image[rows] * negative).sum(-1)
                swap = {"eval_swap_accuracy": float(wins.float().mean())}
            else:
                swap = {}
        clip.model.train()
        # val_loss: keep_best's measure, as the prior's and the decoder's
        return {"eval_loss": loss, "val_loss": loss, "eval_retrieval_accuracy": accuracy, **swap}

    training_loop(worker, job, trainer, loader, train_step, evaluate, state)


STAGE = Stage("train-clip", "train CLIP contrastively on the shards",
              run=lambda config, session: train(config, session, clip_loop, "train_clip"),
              complete=lambda run: training_complete(run, "train_clip"), wanted=lambda run: run.train_clip.enabled)


def main(argv: Optional[list[str]] = None) -> dict:
    """Train the CLIP of the run described by --config."""
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
