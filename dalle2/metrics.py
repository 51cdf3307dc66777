"""Evaluation metrics as the field reports them: the diffusion prior's (as LAION reports them), text-image
agreement (CLIP-R-precision, CLIPScore), and distances between sets of image features (FD/FID, KID, CMMD)."""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .layers import l2norm


@torch.no_grad()
def prior_metrics(
    sample_fn: Callable[..., Tensor],
    text_embed: Tensor,
    image_embed: Tensor,
    text_encodings: Optional[Tensor] = None,
    text_mask: Optional[Tensor] = None,
    **sample_kwargs,
) -> dict[str, float]:
    """Cosine similarities on a held-out batch.

    baseline_similarity: text embed vs. true image embed (what CLIP itself gives)
    text_similarity: predicted image embed vs. text embed
    image_similarity: predicted vs. true image embed (the number that should rise)
    unrelated_similarity: predicted vs. another caption's text embed (captions rolled by one)
    """
    if text_embed.shape[0] < 2:
        raise ValueError("prior metrics need a batch of at least 2 to form unrelated pairs")
    predicted = l2norm(
        sample_fn(text_embed=text_embed, text_encodings=text_encodings, text_mask=text_mask, **sample_kwargs).float()
    )
    text_embed, image_embed = l2norm(text_embed.float()), l2norm(image_embed.float())
    unrelated = text_embed.roll(1, dims=0)

    def cosine(a: Tensor, b: Tensor) -> float:
        return (a * b).sum(-1).mean().item()

    return {
        "baseline_similarity": cosine(text_embed, image_embed),
        "text_similarity": cosine(predicted, text_embed),
        "image_similarity": cosine(predicted, image_embed),
        "unrelated_similarity": cosine(predicted, unrelated),
    }


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[N, M] cosine similarities of two sets of embeddings."""
    return l2norm(a.float()) @ l2norm(b.float()).T


def r_precision(image_embed: Tensor, prompt_embed: Tensor, prompt_index: Optional[Tensor] = None) -> float:
    """How often an image's own prompt ranks first among all `prompt_embed` (top 1 over the whole pool, whose size
    sets the figure's difficulty; evaluations report r_precision_sampled, against a fixed 99 others).
    `prompt_index[i]` is image i's prompt (default: image i goes with prompt i)."""
    own = torch.arange(len(image_embed)) if prompt_index is None else prompt_index
    best = cosine_matrix(image_embed, prompt_embed).argmax(dim=1).cpu()
    return (best == own.cpu()).float().mean().item()


def r_precision_sampled(image_embed: Tensor, caption_embed: Tensor, true_index: Tensor, distractors: int = 99,
                        repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """CLIP-R-precision as papers report it: the true caption against `distractors` random other captions."""
    # Park et al. 2021: each image's true caption competes with 99 others drawn from the held-out captions, so the
    # figure does not depend on the pool's size (ranking against the whole pool, as r_precision does, gets harder
    # as the pool grows); chance is 1 / (k + 1). Repeats with fresh draws give the noise of the figure.
    pool = len(caption_embed)
    if pool < 2:
        raise ValueError(f"R-precision needs a pool of at least 2 distinct captions, got {pool}")
    if distractors < 1 or repeats < 1:
        raise ValueError(f"R-precision needs distractors >= 1 and repeats >= 1, got {distractors} and {repeats}")
    k = min(distractors, pool - 1)
    similarity = cosine_matrix(image_embed, caption_embed).cpu()
    rows, true_index = torch.arange(len(similarity)), true_index.cpu().long()
    true_similarity = similarity[rows, true_index]
    generator = torch.Generator().manual_seed(seed)
    hits = []
    for _ in range(repeats):
        # k distinct others per image: the k smallest of random keys, the true caption's key above every other
        # (keys are in [0, 1)), so it is never drawn as its own distractor
        keys = torch.rand(similarity.shape, generator=generator)
        keys[rows, true_index] = 2.0
        drawn = keys.topk(k, dim=1, largest=False).indices
        best_other = similarity.gather(1, drawn).max(dim=1).values
        hits.append((true_similarity > best_other).double())  # a tie is a miss: the true caption must win outright
    per_image = torch.stack(hits).mean(dim=0)
    n = len(per_image)
    return {
        "r_precision": per_image.mean().item(),
        # over images (each one's hit rate across repeats): the images, not the draws, are the sample that varies
        "r_precision_se": per_image.std().item() / math.sqrt(n) if n > 1 else 0.0,
        "r_precision_chance": 1 / (k + 1),
        "r_precision_candidates": k + 1,
    }


def clip_score(image_embed: Tensor, text_embed: Tensor) -> float:
    """CLIPScore (Hessel et al. 2021, w = 100): 100 x max(cos(image, its text), 0), averaged."""
    return (100 * (l2norm(image_embed.float()) * l2norm(text_embed.float())).sum(-1).clamp(min=0)).mean().item()


def cmmd(x: Tensor, y: Tensor, sigma: float = 10.0, scale: float = 1000.0, unbiased: bool = False) -> float:
    """CMMD (Jayasumana et al. 2024): the squared maximum mean discrepancy between two sets of CLIP image
    embeddings with a Gaussian kernel (sigma 10, reported x1000). By default as the paper's code computes it (means
    over whole kernel matrices: never negative, 0 for identical sets, but above 0 for two small samples of one
    distribution); `unbiased` leaves each set's pairs with themselves out (Gretton et al.'s U-statistic: 0 in
    expectation for one distribution, so it can go below 0), which small evaluation sets need to be compared."""
    x, y = l2norm(x.float()), l2norm(y.float())

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma**2))

    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("CMMD needs at least two embeddings on each side")

    def within(k: Tensor) -> Tensor:  # the mean over a set's pairs; unbiased: without each point with itself
        size = len(k)
        return (k.sum() - k.diagonal().sum()) / (size * (size - 1)) if unbiased else k.mean()

    return (scale * (within(kernel(x, x)) + within(kernel(y, y)) - 2 * kernel(x, y).mean())).item()


class _Features(torch.nn.Module):
    """The identity as torchmetrics' feature extractor: the "images" given to FID and KID are the features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image

    def forward(self, features: Tensor) -> Tensor:
        return features


def _as_features(x: Tensor) -> Tensor:
    """[N, D] features in float64: KID's kernel sums run in the features' dtype (and FID comes back in it)."""
    # both estimates are small differences of large sums (kernel sums for KID, sums of squares for FD's covariance)
    return x.detach().double()


def _not_distributed() -> bool:
    return False


# torchmetrics gathers a metric's state over torch.distributed's default group whenever one is initialised: on a
# Ray Train worker, rank 0 scoring every rank's samples alone would wait for ranks that never come. These figures
# are computed on the features they are given, in the process that calls them.
UNSYNCED = dict(sync_on_compute=False, dist_sync_on_step=False, distributed_available_fn=_not_distributed)


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D] (FID on Inception's)."""
    # through torchmetrics' FID with the features as the "images", so that FID and FD on CLIP features are one
    # maintained implementation (normalize=False: the features reach the module as given, never made bytes)
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = _as_features(x), _as_features(y)
    metric = FrechetInceptionDistance(feature=_Features(num_features=x.shape[1]), normalize=False,
                                      **UNSYNCED).to(x.device)
    metric.update(x, real=True)
    metric.update(y, real=False)
    return metric.compute().item()


def kernel_distance(x: Tensor, y: Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased polynomial-kernel MMD^2, mean and std over random subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    x, y = _as_features(x), _as_features(y)
    if len(x) < 2 or len(y) < 2:  # the unbiased estimate leaves each point's pair with itself out
        raise ValueError(f"KID needs at least 2 feature vectors per side, got {len(x)} and {len(y)}")
    # torchmetrics refuses subsets larger than a set; smaller evaluation sets use all they have
    subset_size = min(subset_size, len(x), len(y))
    with warnings.catch_warnings():  # its warning that it keeps every feature: these are the features
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(feature=_Features(num_features=x.shape[1]), subsets=subsets,
                                         subset_size=subset_size, **UNSYNCED).to(x.device)
    metric.update(x, real=True)
    metric.update(y, real=False)
    # the subsets come from torch's global RNG: seeded here for a reproducible figure, the caller's state kept
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return mean.item(), std.item()


def bootstrap_se(fn: Callable[[Tensor, Tensor], float], x: Tensor, y: Tensor, rounds: int = 20,
                 seed: int = 0) -> float:
    """The standard deviation of fn over `rounds` bootstrap resamples of both sets: the noise of, e.g., FD."""
    # FD is biased by the sample size, so it has no simple standard error; resampling both sets (each is a sample)
    # with replacement gives the spread a different draw of the evaluation images would give
    if rounds < 2:
        raise ValueError(f"a bootstrap standard error needs at least 2 rounds, got {rounds}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(rounds):
        ix = torch.randint(len(x), (len(x),), generator=generator).to(x.device)
        iy = torch.randint(len(y), (len(y),), generator=generator).to(y.device)
        values.append(fn(x[ix], y[iy]))
    return torch.tensor(values, dtype=torch.float64).std().item()


INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


def _load_tensors(weights: str) -> dict[str, Tensor]:
    """Inception's state dict from a local path or fsspec URL, never unpickling anything else."""
    from .checkpoint import load_tensors

    try:
        return load_tensors(weights, "Inception weights")
    except FileNotFoundError:
        raise FileNotFoundError(f"Inception weights {weights!r} not found: FID's standard weights are "
                                f"torch-fidelity's {INCEPTION_WEIGHTS_URL}; fetch them and give their path or URL "
                                "(nothing is downloaded here)") from None


class InceptionFeatures(torch.nn.Module):
    """The 2048-d pool features of FID's Inception v3 (torch-fidelity's port) from a path or fsspec URL."""

    num_features = 2048

    def __init__(self, weights: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        state = _load_tensors(weights)
        # torch-fidelity torch.load()s its path with weights_only=False (it would unpickle whatever the file holds):
        # it gets a file of ours holding only the tensors just checked
        with tempfile.TemporaryDirectory(prefix="inception-") as scratch:
            checked = os.path.join(scratch, "weights.pth")
            torch.save(state, checked)
            try:
                # antialias off: torch-fidelity's TensorFlow-1 resize, which FID's reference implementation uses
                self.extractor = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                                    feature_extractor_weights_path=checked, antialias=False)
            except RuntimeError as error:  # load_state_dict's missing or unexpected keys
                raise ValueError(f"Inception weights {weights!r} are not torch-fidelity's Inception v3 "
                                 f"({INCEPTION_WEIGHTS_URL}): {str(error)[:500]}") from error

    def forward(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] floats in [0, 1] -> [B, 2048] features (the extractor resizes to 299 itself)."""
        # bytes, as torchmetrics' FID makes them (normalize=True): the network was converted for 8-bit images
        return self.extractor((images.clamp(0, 1) * 255).byte()).float()


def kid_subset_size(n: int, m: int) -> int:
    """KID's subset size for sets of n and m features: 1000, or half the smaller set when it has fewer than 2000."""
    return min(1000, max(2, min(n, m) // 2))


def image_distances(real_features: Tensor, fake_features: Tensor, prefix: str,
                    bootstraps: int = 20) -> dict[str, float]:
    """FD (with its bootstrap noise) and KID between two feature sets, keys prefixed (e.g. "clip_", "inception_")."""
    # with InceptionFeatures' features, prefix "inception_" gives inception_fd, which is FID
    n, m = len(real_features), len(fake_features)
    if n < 2 or m < 2:
        raise ValueError(f"FD and KID need at least 2 feature vectors per side, got {n} real and {m} fake")
    # KID's spread comes from its subsets: subsets of a whole small set are all the same set (spread 0), so a set
    # of fewer than 2000 is drawn from in halves (the standard 1000 of at least 2000 features otherwise)
    kid, kid_std = kernel_distance(real_features, fake_features, subset_size=kid_subset_size(n, m))
    return {
        f"{prefix}fd": frechet_distance(real_features, fake_features),
        f"{prefix}fd_se": bootstrap_se(frechet_distance, real_features, fake_features, rounds=bootstraps),
        f"{prefix}kid": kid,
        f"{prefix}kid_std": kid_std,
    }
