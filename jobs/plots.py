"""The dataset report's figures, drawn with matplotlib (Agg: no display needed), each returned as PNG bytes."""

from __future__ import annotations

import io
from collections import Counter
from typing import Optional, Sequence

import numpy as np


def _figure(width: float = 7.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(width, height), dpi=100)
    return plt, figure, axes


def _png(plt, figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def legend_label(text: str) -> str:
    """`text` shown as written: a `$` would start matplotlib maths (a bad formula fails the whole figure), and a
    label starting with `_` would be left out of the legend."""
    text = str(text)[:60].replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def download_outcomes(per_shard: dict[str, dict]) -> bytes:
    """Stacked bars per shard: rows written and rows failed, by reason."""
    plt, figure, axes = _figure()
    shards = sorted(per_shard)
    reasons = sorted({reason for info in per_shard.values() for reason in info["failed"]})
    bottom = np.zeros(len(shards))
    written = np.asarray([per_shard[s]["written"] for s in shards], dtype=float)
    axes.bar(shards, written, label="written", color="#2ca02c")
    # failure colours: matplotlib's cycle without its green, so no reason looks like success
    colours = ["#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#1f77b4"]
    bottom += written
    for i, reason in enumerate(reasons):
        counts = np.asarray([per_shard[s]["failed"].get(reason, 0) for s in shards], dtype=float)
        axes.bar(shards, counts, bottom=bottom, label=legend_label(reason), color=colours[i % len(colours)])
        bottom += counts
    axes.set(xlabel="shard", ylabel="rows", title="Download outcomes per shard")
    axes.tick_params(axis="x", rotation=90 if len(shards) > 12 else 0)
    axes.legend(fontsize=7, loc="lower right")
    return _png(plt, figure)


def image_sizes(widths: Sequence[int], heights: Sequence[int]) -> bytes:
    """Histograms of the original images' longer side and aspect ratio (width / height)."""
    plt, figure, axes = _figure()
    figure.delaxes(axes)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    widths, heights = np.asarray(widths, dtype=float), np.asarray(heights, dtype=float)
    left.hist(np.maximum(widths, heights), bins=30, color="#1f77b4")
    left.set(xlabel="longer side (px)", ylabel="images", title="Original image size")
    right.hist(widths / np.maximum(heights, 1), bins=30, color="#1f77b4")
    right.set(xlabel="width / height", title="Aspect ratio")
    return _png(plt, figure)


def caption_lengths(captions: Sequence[str]) -> bytes:
    """Histogram of caption lengths in words."""
    plt, figure, axes = _figure()
    axes.hist([len(c.split()) for c in captions], bins=range(0, max([len(c.split()) for c in captions] + [1]) + 2),
              color="#1f77b4")
    axes.set(xlabel="words", ylabel="captions", title="Caption length")
    return _png(plt, figure)


def similarity_histogram(similarity: Sequence[float], threshold: Optional[float]) -> bytes:
    """Histogram of CLIP image-caption cosine, with the filter's threshold drawn on it."""
    plt, figure, axes = _figure()
    values = np.asarray(similarity, dtype=float)
    axes.hist(values[np.isfinite(values)], bins=40, color="#1f77b4")
    if threshold is not None:
        axes.axvline(threshold, color="#d62728", linestyle="--", label=f"filter.min_similarity = {threshold:g}")
        axes.legend(fontsize=8)
    axes.set(xlabel="cosine(image, caption)", ylabel="rows", title="CLIP similarity of each image with its caption")
    return _png(plt, figure)


def duplicate_groups(duplicate_of: Sequence[Optional[str]]) -> bytes:
    """How many groups of near-duplicates have each size (the kept row plus the rows dropped as its copies)."""
    plt, figure, axes = _figure()
    sizes = Counter(1 + n for n in Counter(d for d in duplicate_of if d).values())
    if sizes:
        axes.bar([str(k) for k in sorted(sizes)], [sizes[k] for k in sorted(sizes)], color="#1f77b4")
    else:
        axes.text(0.5, 0.5, "no near-duplicates found", ha="center", va="center", transform=axes.transAxes)
    axes.set(xlabel="images in the group", ylabel="groups", title="Near-duplicate groups")
    return _png(plt, figure)


def training_curves(histories: dict[str, list[dict]]) -> bytes:
    """Training loss of each job against its steps (log scale)."""
    plt, figure, axes = _figure()
    for job, lines in histories.items():
        points = sorted({line["step"]: line["loss"] for line in lines if "loss" in line}.items())
        if points:
            axes.plot(*zip(*points), marker=".", label=job)
    axes.set(xlabel="step", ylabel="loss", title="Training loss", yscale="log")
    axes.legend(fontsize=8)
    return _png(plt, figure)


EVAL_METRICS = {"clip": ["eval_retrieval_accuracy"], "prior": ["image_similarity", "unrelated_similarity"],
                "decoder": ["r_precision", "real_r_precision", "image_embed_similarity"]}


def evaluation_curves(histories: dict[str, list[dict]]) -> bytes:
    """Each job's held-out metrics against its steps."""
    plt, figure, axes = _figure()
    for job, lines in histories.items():
        for metric in EVAL_METRICS.get(job.split("_unet")[0], []):
            points = [(line["step"], line[metric]) for line in lines if metric in line]
            if points:
                axes.plot(*zip(*points), marker="o", label=f"{job}: {metric}")
    axes.set(xlabel="step", ylabel="value", title="Evaluation on held-out data")
    axes.legend(fontsize=7)
    return _png(plt, figure)
