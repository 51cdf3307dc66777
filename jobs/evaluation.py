"""How a run's samples are scored, at every decoder evaluation and in the demo's report: metrics as papers report
them, each with its noise, against real images of the same captions.

- CLIP-R-precision: each image's caption against 99 other distinct captions of the run's held-out rows (all of
  them when fewer), repeated with fresh draws; chance and standard error beside it.
- Fréchet distance and KID on CLIP image features (FD_CLIP) by default, and FID / KID on Inception v3 features
  when `eval.inception_weights` names the weights file (nothing is downloaded).
- CMMD, the paper's (biased) figure and the unbiased one; CLIP score.

The scoring CLIP is the run's own unless `eval.clip` names another (any open_clip name with a pretrained tag,
local path or URL, or a checkpoint folder): a decoder conditioned on a CLIP is flattered when judged by it.
"""

from __future__ import annotations


from .training.config import EvalConfig


def scoring_clip(run):
    """The CLIP that scores samples: `eval.clip`, else the run's own."""
    from dalle2.clip import load_clip

    from .checkpoints import run_clip

    source = run.eval.clip
    clip = run_clip(run) if source is None else load_clip(source.model_name, source.pretrained, source.checkpoint)
    return clip.eval().requires_grad_(False)


def caption_pool(root: str, captions: list[str]) -> list[str]:
    """The captions R-precision draws distractors from: `captions` and every distinct held-out caption, once each."""
    from pipeline.formats.holdout import load_holdout

    return list(dict.fromkeys(list(captions) + load_holdout(root).distinct_captions()))


def score_samples(clip, samples, real, captions: list[str], pool: list[str], config: EvalConfig,
                  inception=None, real_set=None) -> dict[str, float]:
    """Scores of generated `samples` ([B, 3, H, W] in [0, 1], sample i drawn for captions[i]) beside the same
    figures on `real` images of those captions (in the same order); `pool` holds every caption (distractors). The
    distances compare the samples with `real_set` (default `real`): distinct images, since a copy counted twice
    makes a set look closer to itself than it is."""
    import torch

    from dalle2.metrics import clip_score, cmmd, image_distances, r_precision_sampled

    real_set = real if real_set is None else real_set
    with torch.no_grad():
        pool_embed = clip.embed_text(pool).text_embed.float().cpu()
        generated = clip.embed_image(samples).float().cpu()
        actual = clip.embed_image(real).float().cpu()
        distinct = actual if real_set is real else clip.embed_image(real_set).float().cpu()
    index = torch.tensor([pool.index(c) for c in captions])
    scores = {"clip_score": clip_score(generated, pool_embed[index])}
    if len(actual) == len(captions):
        scores["real_clip_score"] = clip_score(actual, pool_embed[index])
    if len(pool) >= 2:  # one caption has nothing to be told apart from
        rank = dict(distractors=config.distractors, repeats=config.repeats)
        scores.update(r_precision_sampled(generated, pool_embed, index, **rank))
        if len(actual) == len(captions):
            truth = r_precision_sampled(actual, pool_embed, index, **rank)
            scores.update(real_r_precision=truth["r_precision"], real_r_precision_se=truth["r_precision_se"])
    if len(generated) >= 2 and len(distinct) >= 2:
        scores.update(image_distances(distinct, generated, prefix="clip_", bootstraps=config.bootstraps),
                      cmmd=cmmd(generated, distinct), cmmd_unbiased=cmmd(generated, distinct, unbiased=True))
        if inception is not None:
            with torch.no_grad():
                scores.update(image_distances(inception(real_set.cpu()), inception(samples.cpu()), prefix="inception_",
                                              bootstraps=config.bootstraps))
    return scores


def inception_of(config: EvalConfig):
    """FID's Inception v3 from `eval.inception_weights` (None when not set)."""
    if not config.inception_weights:
        return None
    from dalle2.metrics import InceptionFeatures

    return InceptionFeatures(config.inception_weights)
