"""Train the decoder on Ray Train from the run's shards joined with their aligned image embeddings.

    python -m jobs.train_decoder --config run.yaml [--set train_decoder.unet_number=1]

Each evaluation samples the held-out embeddings (each worker its share, gathered on rank 0), writes a
sample grid (`<root>/train/decoder/samples/step_N.png`: per held-out caption, the generated image beside
the real one) and scores them: R-precision, CLIP score and CMMD beside the same figures on the real images.
"""

from __future__ import annotations

from typing import Optional

from .run_config import RunConfig
from .stage import Stage, training_complete
from .training.driver import train
from .training.loop import training_loop
from .training.rows import planned_steps, training_plans
from .training.worker import Worker, rank_slice, unslice

def sample_grid(samples, reals, captions: list[str]) -> bytes:
    """PNG bytes: one row per held-out sample (generated, then the real image at the same size), its caption
    on the left."""
    import torch

    from dalle2.text_to_image import to_uint8

    from .grids import labelled_grid

    pairs = torch.stack([samples.cpu(), reals.cpu()], dim=1).flatten(0, 1)  # generated, real, generated, real...
    return labelled_grid(to_uint8(pairs), [f"{caption} (generated | real)" for caption in captions], columns=2)


def decoder_loop(config: dict) -> None:
    """One Ray Train worker: stream images with their embeddings, step the chosen unets, evaluate, checkpoint."""
    import torch

    from dalle2.decoder import Decoder
    from dalle2.trainer import DecoderTrainer
    from pipeline.loaders.batches import ImageBatches
    from pipeline.run.layout import TrainLayout
    from pipeline.run.storage import write_atomic

    from .checkpoints import CaptionEncoder, init_source, run_clip

    run = RunConfig.model_validate(config)
    job = run.train_decoder
    worker = Worker(run, job)
    torch.manual_seed(job.seed)
    init, decoder_config = init_source(run, "train_decoder")
    decoder = Decoder(config=decoder_config)
    numbers = [job.unet_number] if job.unet_number else list(range(1, len(decoder.unets) + 1))
    size = decoder.image_sizes[-1]
    train_plan, eval_plan = training_plans(run, "train_decoder")  # never the held-out rows; evaluated on them
    loader = ImageBatches(run.root, train_plan, job.batch_size, worker.rank, worker.world_size, job.seed,
                          job.shuffle_buffer, image_size=size)
    trainer = DecoderTrainer(decoder, job.trainer, device=worker.device, unet_numbers=numbers, parallel=job.parallel,
                             planned_steps=planned_steps(job, loader, parts=len(numbers)))
    encoder = None
    text_unets = [n for n in numbers if decoder.config.unets[n - 1].cond_on_text_encodings]
    if text_unets:  # per-token text features from the captions, step by step
        encoder = CaptionEncoder(run, worker.device, job.trainer.amp)
        for n in text_unets:
            unet = decoder.config.unets[n - 1]
            encoder.check(unet.text_encoding_dim or unet.image_embed_dim, unet.max_text_len,
                          f"train_decoder.decoder.unets[{n - 1}].text_encoding_dim / max_text_len")
    state = worker.resume(trainer.load)
    if init and trainer.step == 0:  # nothing of its own to resume: start from init_from's weights
        trainer.init_weights(init)
    held_out = None if not eval_plan.size else next(ImageBatches(
        run.root, eval_plan, min(job.eval_samples, eval_plan.size), shuffle_buffer=1, image_size=size).epoch(0))
    clip = (encoder.clip if encoder is not None else run_clip(run).to(worker.device)) if worker.rank == 0 else None
    scorer = inception = pool = None
    if worker.rank == 0 and held_out is not None:  # rank 0 scores every rank's samples
        from .evaluation import caption_pool, inception_of, scoring_clip

        scorer = clip if run.eval.clip is None else scoring_clip(run).to(worker.device)
        inception, pool = inception_of(run.eval), caption_pool(run.root, list(held_out["caption"]))
    # each rank samples its share, rank 0 scores all (no held-out rows: no evaluation, on every rank alike)
    mine = rank_slice(held_out, worker.rank, worker.world_size) if held_out is not None else None
    # batches trained so far, so a resumed run gives each stage the batches an uninterrupted run would
    # (a checkpoint is taken where no unet holds accumulated batches: each of its optimizer steps took
    # grad_accum_every batches, whatever number of workers trained them)
    counter = {"batches": trainer.step * job.trainer.grad_accum_every}

    def conditioning(batch: dict, number: int) -> dict:
        wants_text = encoder is not None and decoder.config.unets[number - 1].cond_on_text_encodings
        return {"image_embed": batch["image_embed"], **(encoder(batch["caption"]) if wants_text else {})}

    def train_step(batch: dict) -> float:
        number = numbers[counter["batches"] % len(numbers)]  # every chosen stage in turn
        counter["batches"] += 1
        return trainer.train_step({"image": batch["image"], **conditioning(batch, number), "seeds": batch["seed"]},
                                  unet_number=number)

    def validation_losses() -> dict:
        """Each trained stage's held-out loss (val_loss: their mean), pooled over the ranks' shares."""
        count, losses = len(mine["image_embed"]), {}
        if count:
            for number in numbers:
                losses[f"val_loss_unet{number}"] = trainer.validation_loss(
                    {"image": mine["image"], **conditioning(mine, number), "seeds": mine["seed"]}, unet_number=number)
            losses["val_loss"] = sum(losses.values()) / len(numbers)
        return worker.pooled(losses, count)

    def evaluate(step: int) -> dict:
        if mine is None:
            return {}
        losses = validation_losses()
        samples = None
        if len(mine["image_embed"]):
            text = encoder(mine["caption"]) if encoder is not None else {}
            # a later stage trained alone upsamples the real images in place of the stages before it
            start = mine["image"] if min(numbers) > 1 else None
            samples = trainer.sample(image_embed=mine["image_embed"].to(worker.device), start_image=start, **text,
                                     **run.sampling.decoder_kwargs(),
                                     generator=torch.Generator(worker.device).manual_seed(job.seed + worker.rank))
        parts = worker.gathered(samples.cpu() if samples is not None else None)
        if worker.rank != 0:
            return losses  # the same on every rank: each keeps (or not) the same best step
        samples = unslice(parts).to(worker.device)
        embeds = held_out["image_embed"].to(worker.device)
        real = torch.nn.functional.interpolate(held_out["image"], size=samples.shape[-2:], mode="bilinear",
                                               antialias=True)
        grid = sample_grid(samples, real, list(held_out["caption"]))
        write_atomic(TrainLayout(run.root).sample_grid(job.job_name, step), grid)
        worker.tracker.artifact(f"samples/step_{step}.png", grid, step=step)
        metrics = {**losses, "sample_mse": float(((samples.cpu() - real) ** 2).mean()), "eval_images": len(samples)}
        if clip is not None and clip.embed_dim == embeds.shape[1]:
            metrics["image_embed_similarity"] = float(
                (clip.embed_image(samples) * torch.nn.functional.normalize(embeds, dim=-1)).sum(-1).mean())
        # do the samples match their held-out captions as well as the real images do (and look like them)?
        from .evaluation import score_samples

        metrics.update(score_samples(scorer, samples, real.to(worker.device), list(held_out["caption"]), pool,
                                     run.eval, inception))
        return metrics

    training_loop(worker, job, trainer, loader, train_step, evaluate, state)


STAGE = Stage("train-decoder", "train the decoder on the shards and their embeddings",
              run=lambda config, session: train(config, session, decoder_loop, "train_decoder"),
              complete=lambda run: training_complete(run, "train_decoder"))


def main(argv: Optional[list[str]] = None) -> dict:
    """Train the decoder of the run described by --config."""
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
