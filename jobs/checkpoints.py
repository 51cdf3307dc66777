"""A run's checkpoints: uploading them from a worker, finding the newest complete one, loading what a run trained (its
CLIP, and DALLE2 from the latest prior and decoder checkpoints)."""

from __future__ import annotations

import logging
from typing import Optional

from pipeline.run.layout import TrainLayout

from .run_config import RunConfig

log = logging.getLogger(__name__)


def with_scheme(root: str, path: str) -> str:
    """A path Ray gives (without its scheme: `bucket/run/...`) as a URL on the run root's filesystem."""
    return path if "://" in path or "://" not in root else f"{root.split('://')[0]}://{path}"


def upload_checkpoint(root: str, local, name: str):
    """Ray Train's upload of rank 0's local checkpoint `local` to `name` in the job's folder (a
    `checkpoint_upload_fn`): each file written whole (local: temporary name, fsync, rename; object stores: one
    PUT), the COMPLETE marker last, so a folder Ray may list is never taken as a checkpoint before every file of
    it is there (Ray's own copy runs in threads, in any order, and never fsyncs)."""
    import os

    import ray.train

    from dalle2.checkpoint import COMPLETE_FILE, write_bytes
    from dalle2.faults import crash_point

    storage = ray.train.get_context().get_storage()
    path = storage.build_checkpoint_path_from_name(name)
    names = sorted(os.listdir(local.path))  # save() wrote plain files there
    for file in [n for n in names if n != COMPLETE_FILE] + [n for n in names if n == COMPLETE_FILE]:
        if file == COMPLETE_FILE:
            crash_point("train.before_marker")  # every file persisted, no marker: never resumed from
        with open(os.path.join(local.path, file), "rb") as f:
            write_bytes(f"{with_scheme(root, path)}/{file}", f.read())
    return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)


def latest_checkpoint(root: str, job_name: str, skip: tuple[str, ...] = ()) -> Optional[str]:
    """The newest complete checkpoint folder of a job (its COMPLETE marker there and its files matching it), of
    those its summary names and its run folder lists; incomplete ones (a crash mid-save) are passed over with a
    warning naming them, and those in `skip` silently."""
    from dalle2.checkpoint import incomplete_reason
    from pipeline.run.storage import exists, list_files, read_json

    layout = TrainLayout(root)
    found = {with_scheme(root, p).rstrip("/") for p in list_files(layout.job(job_name))
             if p.rsplit("/", 1)[-1].startswith("checkpoint_") and not p.endswith(".json")}
    named = read_json(layout.summary(job_name)).get("checkpoint") if exists(layout.summary(job_name)) else None
    if named:
        found.add(with_scheme(root, named).rstrip("/"))
    # Ray names checkpoints by the time they were made: the newest first, whichever run made it
    for candidate in sorted(found - {s.rstrip("/") for s in skip}, key=lambda p: p.rsplit("/", 1)[-1], reverse=True):
        reason = incomplete_reason(candidate)
        if reason is None:
            return candidate
        log.warning("%s: checkpoint %s is passed over: %s", job_name, candidate, reason)
    return None


def training_jobs(root: str) -> list[str]:
    """The training jobs that finished at least once in this run (clip, prior, decoder, decoder_unet2, ...)."""
    from pipeline.run.storage import list_files

    names = [url.rsplit("/", 1)[-1][: -len(TrainLayout.SUMMARY)] for url in list_files(TrainLayout(root).storage, TrainLayout.SUMMARY)]
    order = {"clip": 0, "prior": 1}
    return sorted(names, key=lambda name: (order.get(name, 2), name))


def run_clip(run: RunConfig):
    """The run's CLIP: the one train_clip produced, else embed.clip (a checkpoint, or an open_clip name)."""
    from dalle2.clip import load_clip

    trained = latest_checkpoint(run.root, "clip")
    if trained:
        return load_clip(checkpoint=trained)
    source = run.embed.clip
    return load_clip(source.model_name, source.pretrained, source.checkpoint)


class CaptionEncoder:
    """The run's CLIP (the one embed used), frozen and in eval mode on a training worker's device: turns a
    batch's captions into per-token text encodings and their mask inside the step. The encodings are
    never stored: 77 x width floats per caption is far more than the data set itself at LAION scale."""

    def __init__(self, run: RunConfig, device, amp: str = "none"):
        self.clip = run_clip(run).to(device).eval().requires_grad_(False)
        self.device = device
        # Half precision on GPU, as the embed stage runs; CPU autocast buys nothing for this tower.
        self.dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(amp, "float16")

    def check(self, width: int, max_len: int, field: str) -> None:
        """Raise naming `field` when a model's text inputs do not fit this CLIP's token features."""
        if width != self.clip.text_encoding_dim or max_len < self.clip.max_text_len:
            raise ValueError(f"{field}: the run's CLIP ({self.clip.config.model_name}) gives {self.clip.max_text_len} "
                             f"tokens of width {self.clip.text_encoding_dim}, the model takes {max_len} of width {width}")

    def __call__(self, captions) -> dict:
        """{'text_encodings': [B, T, W], 'text_mask': [B, T]} of the captions, on the worker's device."""
        import contextlib

        import torch

        cast = torch.autocast("cuda", dtype=getattr(torch, self.dtype)) if torch.device(self.device).type == "cuda" \
            else contextlib.nullcontext()
        with torch.no_grad(), cast:
            out = self.clip.embed_text(list(captions))
        return {"text_encodings": out.text_encodings.float(), "text_mask": out.mask}


def decoder_checkpoints(run: RunConfig) -> list[str]:
    """The latest checkpoint of each decoder job of the run: imported weights (`decoder_imported`) first, then the
    whole cascade's (`decoder`), then each stage's own (`decoder_unet{k}`), so loading them in this order lets what
    the run trained win, and a stage trained on its own win over the cascade's."""

    jobs = [job for job in training_jobs(run.root) if job == "decoder" or job.startswith("decoder_unet")]
    imported = TrainLayout.IMPORTED["decoder"]
    jobs = [imported] * (imported in training_jobs(run.root)) + jobs
    return [c for c in (latest_checkpoint(run.root, job) for job in jobs) if c]


def prior_checkpoint_of(root: str) -> Optional[str]:
    """The run's latest prior checkpoint: its own training's, else the imported one (`dalle2 import`)."""
    return latest_checkpoint(root, "prior") or latest_checkpoint(root, TrainLayout.IMPORTED["prior"])


def load_models(run: RunConfig, use_ema: bool = True, prior_checkpoint: Optional[str] = None,
                decoder_checkpoint: Optional[str] = None, clip=None):
    """(prior, decoder) from the run's latest prior and decoder checkpoints (EMA weights by default), the prior
    with `clip`; the decoder's unets may come from separate jobs, and every unet must have been trained by one."""
    from dalle2.checkpoint import load_checkpoint, load_state
    from dalle2.configs import DecoderConfig, PriorConfig
    from dalle2.decoder import Decoder
    from dalle2.prior import DiffusionPrior

    prior_checkpoint = prior_checkpoint or prior_checkpoint_of(run.root)
    if not prior_checkpoint:
        raise FileNotFoundError(f"{run.root} has no prior checkpoint yet: run train-prior (or dalle2 import)")
    prior = DiffusionPrior(clip=clip, config=PriorConfig(**load_state(prior_checkpoint)["config"]))
    load_checkpoint(prior_checkpoint, prior, prior.config.model_dump(mode="json"), use_ema=use_ema)

    checkpoints = [decoder_checkpoint] if decoder_checkpoint else decoder_checkpoints(run)
    if not checkpoints:
        raise FileNotFoundError(f"{run.root} has no decoder checkpoint yet: run train-decoder (or dalle2 import)")
    checkpoints = same_decoder(checkpoints)
    config = DecoderConfig(**load_state(checkpoints[0])["config"])
    decoder = Decoder(config=config)
    loaded: set[int] = set()
    for checkpoint in checkpoints:  # each loads only the unets it trained (its `parts`)
        state = load_checkpoint(checkpoint, decoder, config.model_dump(mode="json"), use_ema=use_ema)
        parts = state.get("parts") or [f"unets.{i}." for i in range(len(config.unets))]
        loaded |= {int(part.split(".")[1]) + 1 for part in parts if part.startswith("unets.")}
    missing = [n for n in range(1, len(config.unets) + 1) if n not in loaded]
    if missing:
        raise FileNotFoundError(f"{run.root}: decoder unets {missing} were never trained (their weights would be "
                                f"random): run train-decoder, or train-decoder with train_decoder.unet_number=<k>")
    log.info("loaded the prior from %s and the decoder from %s", prior_checkpoint, checkpoints)
    return prior.eval(), decoder.eval()


def same_decoder(checkpoints: list[str]) -> list[str]:
    """The decoder checkpoints that make one model: those of the run's own decoder (the first trained one's config),
    or the imported one alone; an imported decoder of another architecture is passed over, saying so."""
    from dalle2.checkpoint import load_state
    from dalle2.configs import config_diff

    imported = f"/{TrainLayout.IMPORTED['decoder']}/"
    trained = [c for c in checkpoints if imported not in c]
    if not trained:
        return checkpoints
    base = load_state(trained[0])["config"]
    kept = []
    for checkpoint in checkpoints:
        diffs = config_diff(load_state(checkpoint)["config"], base) if imported in checkpoint else []
        if diffs:
            log.info("the imported decoder %s is not the run's decoder architecture (%s): the run's own is used",
                     checkpoint, "; ".join(diffs[:3]))
        else:
            kept.append(checkpoint)
    return kept


def load_dalle2(run: RunConfig, use_ema: bool = True, prior_checkpoint: Optional[str] = None,
                decoder_checkpoint: Optional[str] = None):
    """DALLE2 (the run's CLIP, its latest prior and decoder; see load_models)."""
    from dalle2.text_to_image import DALLE2

    prior, decoder = load_models(run, use_ema, prior_checkpoint, decoder_checkpoint, clip=run_clip(run))
    return DALLE2(prior, decoder)


def init_source(run: RunConfig, section: str, driver: bool = False):
    """(checkpoint folder, model config) a prior or decoder job starts from: its `init_from` checkpoint and the
    config saved with it, else (None, the job's own config). Refuses, naming the fields, an `init_from` that is not a
    complete checkpoint, weights whose width is not the run's embeddings', and (`driver`: the config as the user gave
    it, not as workers get it, every field spelled out) a model setting that contradicts the checkpoint."""
    from dalle2.checkpoint import COMPLETE_FILE, STATE_FILE, exists, load_state, require_complete
    from dalle2.configs import DecoderConfig, PriorConfig, config_diff, resolve
    from pipeline.formats.aligned import embedding_width
    from pipeline.run.layout import RunLayout

    from .config_io import ConfigError

    job = getattr(run, section)
    kind = "prior" if section == "train_prior" else "decoder"
    config_cls = PriorConfig if kind == "prior" else DecoderConfig
    own = resolve(config_cls, getattr(job, kind), kind)
    if not job.init_from:
        return None, own
    source = job.init_from.rstrip("/")
    if exists(f"{source}/{COMPLETE_FILE}") or exists(f"{source}/{STATE_FILE}"):
        folder = source
    elif kind == "prior":
        folder = prior_checkpoint_of(source)
    else:
        folder = latest_checkpoint(source, "decoder") or latest_checkpoint(source, TrainLayout.IMPORTED["decoder"])
    if folder is None:
        raise ConfigError(f"{section}.init_from={job.init_from}: neither a checkpoint folder nor a run root "
                          f"with a {kind} checkpoint (train-{kind}, or dalle2 import)")
    try:
        require_complete(folder)
    except FileNotFoundError as error:  # no COMPLETE marker, or files that do not match it
        raise ConfigError(f"{section}.init_from: {error}") from None
    saved = config_cls(**load_state(folder)["config"])
    if driver and kind in job.model_fields_set and own != saved:
        diffs = config_diff(saved.model_dump(mode="json"), own.model_dump(mode="json"))
        raise ConfigError(f"{section}.{kind} differs from the model {section}.init_from starts from ({folder}): "
                         f"{'; '.join(diffs[:5])}. Leave {section}.{kind} unset to train the checkpoint's")
    width = embedding_width(RunLayout(run.root))
    embed_dim = saved.net.resolved_embed_dim if kind == "prior" else saved.unets[0].image_embed_dim
    if width is not None and embed_dim != width and not (kind == "decoder" and saved.unconditional):
        raise ConfigError(f"{section}.init_from={job.init_from}: its {kind} takes {embed_dim}-dim CLIP embeddings, "
                         f"the run's are {width}-dim (embed.clip {run.embed.clip.model_name}): fine-tune with the "
                         "CLIP it was trained on")
    return folder, saved
