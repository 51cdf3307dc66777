"""Contrastive training of an open_clip model (for runs without a pretrained CLIP)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .clip import ClipAdapter
from .trainer_config import TrainerConfig
from .trainer import DiffusionTrainer


def contrastive_loss(clip: ClipAdapter, images: Tensor, captions: Sequence[str]) -> Tensor:
    """Symmetric InfoNCE over the batch; pairs with identical captions all count as positives."""
    image_features = clip.model.encode_image(clip.preprocess(images))
    text_features = clip.model.encode_text(clip.tokenize(captions))
    return info_nce(image_features, text_features, captions, clip.model.logit_scale)


def info_nce(image_features: Tensor, text_features: Tensor, captions: Sequence[str], logit_scale: Tensor) -> Tensor:
    """The symmetric InfoNCE of paired features ([N, D] each, normalised here) at CLIP's learned temperature."""
    image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_features @ text_features.T
    # small data sets repeat captions; a one-hot target would push apart pairs that match
    same = torch.tensor([[a == b for b in captions] for a in captions], device=logits.device, dtype=logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


class ClipTrainer(DiffusionTrainer):
    """The generic trainer (warmup, clipping, EMA, accumulation, all-reduce) on the open_clip model.

    Its checkpoints hold the open_clip weights under their own names with a ClipConfig, so
    `ClipAdapter.from_checkpoint` (the embed stage, the prior, the decoder) reads them directly.
    """

    def __init__(self, clip: ClipAdapter, config: Optional[TrainerConfig] = None, device=None, **kwargs):
        self.clip = clip
        clip.model.requires_grad_(True)
        super().__init__(clip.model, [clip.model], config, device, **kwargs)
        self.clip.to(self.device)

    def model_config(self) -> dict:
        return self.clip.checkpoint_config()

    def compute_loss(self, batch: dict[str, Any], part: int) -> Tensor:
        return contrastive_loss(self.clip, batch["image"].to(self.device), list(batch["caption"]))
