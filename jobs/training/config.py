"""The training jobs' configs (train_clip, train_prior, train_decoder) and evaluation's: typed, bounded, laptop defaults."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from dalle2.configs import StrictModel
from dalle2.trainer_config import TrainerConfig
from pipeline.run.config import ClipSource, Resources


# `init_from`: a checkpoint folder (a run's, or one `dalle2 import` wrote), or a run root whose latest checkpoint of the
# model (trained, else imported) is taken. Weights only (the EMA ones where saved), a fresh optimizer at step 0; only
# when the job has no checkpoint of its own (a re-run resumes that); a folder without its COMPLETE marker is refused.


class TrainJobConfig(StrictModel):
    """Settings shared by train_clip, train_prior and train_decoder."""

    workers: PositiveInt = 2
    # how workers share the model: ddp keeps a whole copy on each; fsdp shards parameters, gradients and optimizer
    # state over them (a unet too big for one device), gathering each block just before it runs
    parallel: Literal["ddp", "fsdp"] = "ddp"
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    resources_per_worker: Resources = {}  # custom resources, e.g. {gpu_pool: 0.001}: workers on the GPU node type
    max_failures: int = Field(default=1, ge=-1)  # a crashed worker restarts from its latest checkpoint this many times (-1: always)
    keep_checkpoints: PositiveInt = 2
    # also keep the checkpoint of the lowest held-out loss (val_loss, every evaluation) in <job>/best/, beside the last K
    keep_best: bool = False
    epochs: PositiveInt = 1
    max_steps: Optional[PositiveInt] = None  # stop early after this many optimizer steps in total
    batch_size: PositiveInt = 32
    eval_every: PositiveInt = 50
    eval_size: PositiveInt = 32  # held-out rows (the run's holdout section) each evaluation reads, at most
    checkpoint_every: PositiveInt = 50
    log_every: PositiveInt = 20  # a progress line (step, loss, steps/s) from rank 0
    shuffle_buffer: PositiveInt = 256
    seed: NonNegativeInt = 0
    trainer: TrainerConfig = TrainerConfig()
    torch_threads: PositiveInt = Field(default=1, description="torch threads per worker (CPU training)")


class TrainPriorConfig(TrainJobConfig):
    """The prior's training job."""

    prior: Union[str, dict] = "tiny"  # a registered architecture (dalle2/model_configs/prior) or a dict
    # start from these weights (see INIT_FROM); the architecture is the checkpoint's, so leave `prior` unset
    init_from: Optional[str] = None

    @property
    def job_name(self) -> str:
        """Where this job's checkpoints go: <root>/train/prior."""
        return "prior"


class TrainDecoderConfig(TrainJobConfig):
    """The decoder's training job."""

    decoder: Union[str, dict] = "tiny"  # a registered architecture (dalle2/model_configs/decoder) or a dict
    init_from: Optional[str] = None  # as train_prior.init_from, for the decoder
    unet_number: Optional[PositiveInt] = None  # train this stage only; None: every stage, in turn, batch by batch
    eval_samples: PositiveInt = 8  # held-out embeddings drawn into the sample grid (with the run's `sampling`)

    @property
    def job_name(self) -> str:
        """Where this job's checkpoints go: `decoder` for the whole cascade, `decoder_unet{k}` for stage k alone,
        so stages trained by separate jobs (each on the GPUs it needs) never resume from each other."""
        return "decoder" if self.unet_number is None else f"decoder_unet{self.unet_number}"


class SamplingConfig(StrictModel):
    """How the run's models sample, alike in its evaluations, the demo's samples.png and `dalle2 sample` (whose flags
    override each setting)."""

    prior_cond_scale: float = Field(default=1.0, ge=0, le=30)  # the prior's classifier-free guidance (1: none)
    decoder_cond_scale: float = Field(default=1.0, ge=0, le=30)  # every unet's
    # image embeddings the prior draws per text, the one closest to the text kept (None: the prior's
    # num_samples_per_batch)
    candidates: Optional[PositiveInt] = None
    # None: each model's own diffusion.sampler and sample_timesteps; set: every model samples with it
    sampler: Optional[Literal["ddim", "ddpm", "dpmpp"]] = None
    steps: Optional[PositiveInt] = None

    def prior_kwargs(self) -> dict:
        """DiffusionPrior.sample's arguments for these settings."""
        return dict(cond_scale=self.prior_cond_scale, num_samples_per_batch=self.candidates,
                    sample_timesteps=self.steps, sampler=self.sampler)

    def decoder_kwargs(self) -> dict:
        """Decoder.sample's arguments for these settings."""
        return dict(cond_scale=self.decoder_cond_scale, sample_timesteps=self.steps, sampler=self.sampler)

    def described(self) -> str:
        """One line naming every setting used (for logs and the outputs' metadata)."""
        own = "each model's"
        return (f"prior guidance {self.prior_cond_scale:g}, decoder guidance {self.decoder_cond_scale:g}, "
                f"{self.candidates or 'the prior config'} candidates, sampler {self.sampler or own}, "
                f"{self.steps or own} steps")


class TrackingConfig(StrictModel):
    """Experiment tracking of the training jobs (rank 0); TensorBoard is always written, under train/<job>/tensorboard."""

    mlflow: bool = False  # log params, metrics, sample grids and the config to MLflow (Ray Train's setup_mlflow)
    # None: a file store at <root>/mlruns (a local root; an s3:// or gs:// root needs a tracking server's URI)
    mlflow_tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # None: the run root's folder name; one MLflow run per job (clip, prior, ...)
    # Weights & Biases through Ray Train's setup_wandb: one run per job in the project, the same metrics, grids and
    # config; offline (no network needed) writes train/<job>/wandb/offline-run-*, which `wandb sync` uploads later
    wandb: bool = False
    wandb_project: Optional[str] = None  # None: the experiment's name
    wandb_mode: Literal["offline", "online"] = "offline"  # online needs WANDB_API_KEY (or `wandb login`) on the workers


class TrainClipConfig(TrainJobConfig):
    """The CLIP training job (contrastive, on the run's shards)."""

    enabled: bool = True  # False when embed.clip names a pretrained CLIP to use instead
    model_name: str = "tiny-clip"  # an open_clip architecture (ours in dalle2/model_configs/clip or open_clip's)
    # NegCLIP: each image is also contrasted with the batch's captions with two content words swapped (the same bag
    # of words bound differently), so CLIP must read which word goes where; the evaluation reports
    # eval_swap_accuracy either way
    hard_negatives: bool = False

    @model_validator(mode="after")
    def _check_parallel(self) -> "TrainClipConfig":
        if self.parallel == "fsdp":  # open_clip's encoders run outside forward(), where FSDP gathers a unit
            raise ValueError("train_clip.parallel: fsdp shards the prior and the decoder; CLIP trains with ddp")
        if self.hard_negatives and not self.enabled:  # a pretrained CLIP is used as it is
            raise ValueError("train_clip.hard_negatives trains CLIP against swapped captions, but train_clip.enabled "
                             "is false (embed.clip's pretrained CLIP is used as it is)")
        return self

    @property
    def job_name(self) -> str:
        """Where this job's checkpoints go: <root>/train/clip."""
        return "clip"


class EvalConfig(StrictModel):
    """How samples are scored (decoder evaluations and the demo's report)."""

    clip: Optional[ClipSource] = None  # the scoring CLIP; None: the run's own
    # FID and KID: torch-fidelity's Inception v3 weights (weights-inception-2015-12-05-6726825d.pth), a local path or
    # any fsspec URL; None: no FID (FD and KID on CLIP features are always given)
    inception_weights: Optional[str] = None
    distractors: PositiveInt = 99  # R-precision: other captions each true caption competes with
    repeats: PositiveInt = 10  # R-precision: fresh draws of the distractors
    bootstraps: int = Field(default=20, ge=2, le=1000)  # resamples giving FD's noise
