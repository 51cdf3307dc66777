"""Small runs for the training tests: generated shards plus aligned embeddings that depend on the image."""

from __future__ import annotations

import numpy as np

from pipeline.execution.session import RaySession
from pipeline.formats.aligned import align, write_aligned
from pipeline.run.config import FilterConfig
from pipeline.stages.filter.stage import run_filter
from pipeline.run.layout import RunLayout, index_width
from jobs.shapes import write_shards


def make_training_run(root: str, count: int, per_shard: int, size: int = 32, dim: int = 64, seed: int = 0,
                      filter_config: FilterConfig | None = FilterConfig(distributor="local"),
                      embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Shards of shape images and aligned embeddings: image_embed = normalize(P @ pixels of the 4x4 thumbnail),
    text_embed = normalize(W @ image_embed), so the prior and the decoder both have something to learn; or the
    given (image, text) embeddings, row for row."""
    samples = write_shards(root, count, per_shard=per_shard, size=size, seed=seed)
    rng = np.random.default_rng(seed)
    projection, mapping = rng.standard_normal((dim, 48)), rng.standard_normal((dim, dim))
    layout = RunLayout(root)
    for shard_id, start in enumerate(range(0, count, per_shard)):
        chunk = samples[start : start + per_shard]
        thumbs = np.stack([np.asarray(img.resize((4, 4)), np.float32).reshape(-1) / 255 - 0.5 for _, img in chunk])
        img_emb = thumbs @ projection.T
        img_emb /= np.linalg.norm(img_emb, axis=1, keepdims=True)
        text_emb = img_emb @ mapping.T
        text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
        if embeddings is not None:
            img_emb, text_emb = (np.asarray(e[start : start + per_shard], np.float32) for e in embeddings)
        aligned = align(shard_id, len(chunk), 5, index_width(per_shard), np.arange(len(chunk)),
                        img_emb.astype(np.float16), text_emb.astype(np.float16), [s.caption for s, _ in chunk])
        write_aligned(layout, f"{shard_id:05d}", aligned)
    if filter_config is not None:  # the default keeps every row: training reads the filter's masks
        run_filter(filter_config, root, RaySession())


# `dalle2 demo` with short training through --set, as a quick first try would run it (the demo's own steps take about
# 7 minutes here); the README's commands and the tests of a user's list and of a quick demo use it
QUICK_TRAINING = [
    "train_clip.max_steps=40", "train_clip.eval_every=40", "train_clip.checkpoint_every=40", "train_clip.batch_size=64",
    "train_prior.max_steps=60", "train_prior.eval_every=60", "train_prior.checkpoint_every=60",
    "train_prior.batch_size=64", "train_decoder.max_steps=40", "train_decoder.eval_every=40",
    "train_decoder.checkpoint_every=40", "demo.samples_per_prompt=2",
]
