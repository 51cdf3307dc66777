"""Contrastive training of an open_clip model (for runs without a pretrained CLIP)."""

from __future__ import annotations

import random
import re
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .clip import ClipAdapter
from .trainer_config import TrainerConfig
from .trainer import DiffusionTrainer


# words a swap leaves in place: a negative that only moves "a" or "the" is not hard, it is the same caption
STOP_WORDS = frozenset("a an the of on in at to with and or is are by for from its it this that".split())


def caption_swaps(caption: str) -> list[str]:
    """Every NegCLIP hard negative of `caption`: two of its distinct content words swapped ("a red square on the
    left" -> "a left square on the red"), the same bag of words bound differently; one per pair, in word order."""
    words = re.findall(r"\S+", caption)
    content = [i for i, w in enumerate(words) if w.lower().strip(".,;:!?") not in STOP_WORDS]
    pairs = [(i, j) for n, i in enumerate(content) for j in content[n + 1:] if words[i].lower() != words[j].lower()]
    return [" ".join(words[j] if k == i else words[i] if k == j else w for k, w in enumerate(words)) for i, j in pairs]


def swapped_caption(caption: str, rng: random.Random) -> Optional[str]:
    """One of `caption`'s swaps (caption_swaps), drawn by `rng`; None when it has no two distinct content words."""
    swaps = caption_swaps(caption)
    return rng.choice(swaps) if swaps else None


def contrastive_loss(clip: ClipAdapter, images: Tensor, captions: Sequence[str],
                     negatives: Sequence[str] = ()) -> Tensor:
    """Symmetric InfoNCE over the batch; pairs with identical captions all count as positives. `negatives`: extra
    captions every image is contrasted with too (NegCLIP's swapped-word hard negatives), positives of none."""
    image_features = clip.model.encode_image(clip.preprocess(images))
    text_features = clip.model.encode_text(clip.tokenize(list(captions) + list(negatives)))
    return info_nce(image_features, text_features, captions, clip.model.logit_scale)


def info_nce(image_features: Tensor, text_features: Tensor, captions: Sequence[str], logit_scale: Tensor) -> Tensor:
    """The symmetric InfoNCE of paired features ([N, D] images, [N + M, D] texts: the N paired captions, then M hard
    negatives that only the image-to-text direction sees; normalised here) at CLIP's learned temperature."""
    image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    n = len(captions)
    logits = logit_scale.exp().clamp(max=100) * image_features @ text_features.T
    # small data sets repeat captions; a one-hot target would push apart pairs that match
    same = torch.tensor([[a == b for b in captions] for a in captions], device=logits.device, dtype=logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = F.cross_entropy(logits, F.pad(targets, (0, logits.shape[1] - n)))
    return (image_to_text + F.cross_entropy(logits[:, :n].T, targets.T)) / 2


class ClipTrainer(DiffusionTrainer):
    """The generic trainer (warmup, clipping, EMA, accumulation, all-reduce) on the open_clip model.

    Its checkpoints hold the open_clip weights under their own names with a ClipConfig, so
    `ClipAdapter.from_checkpoint` (the embed stage, the prior, the decoder) reads them directly.
    """

    def __init__(self, clip: ClipAdapter, config: Optional[TrainerConfig] = None, device=None,
                 hard_negatives: bool = False, seed: int = 0, **kwargs):
        self.clip = clip
        self.hard_negatives, self.seed = hard_negatives, seed
        clip.model.requires_grad_(True)
        super().__init__(clip.model, [clip.model], config, device, **kwargs)
        self.clip.to(self.device)

    def model_config(self) -> dict:
        return self.clip.checkpoint_config()

    def compute_loss(self, batch: dict[str, Any], part: int) -> Tensor:
        captions = list(batch["caption"])
        negatives = []
        if self.hard_negatives:  # a fresh swap for every caption, every step; the same ones on a resumed step
            rng = random.Random(f"{self.seed}/{self.steps[part]}")
            swaps = (swapped_caption(c, rng) for c in captions)
            negatives = [neg for neg in swaps if neg is not None and neg not in captions]
        return contrastive_loss(self.clip, batch["image"].to(self.device), captions, negatives)
