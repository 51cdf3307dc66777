"""CLIP through open-clip-torch: text and image embeddings for the prior, the decoder and the embed stage.

Three ways to get one:
  ClipAdapter("ViT-B-32", pretrained="laion2b_s34b_b79k")   open_clip's names and weights (cluster runs)
  ClipAdapter("tiny-clip")                                    an architecture from dalle2/model_configs/clip,
                                                              randomly initialised (tests, the demo)
  ClipAdapter.from_checkpoint(url)                            weights saved by `save` or by train_clip
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_checkpoint, load_state, save_checkpoint, trainable_state
from .clip_spec import OPENAI_MEAN, OPENAI_STD, register_model_configs
from .configs import StrictModel

log = logging.getLogger(__name__)


def clip_preprocess(images: Tensor, size: int, mean: Tensor, std: Tensor) -> Tensor:
    """[B, 3, H, W] floats in [0, 1] -> CLIP input: shortest side resized to `size`, centre-cropped, normalised.

    The one preprocessing path: the adapter and the embed stage's CPU decode both call it.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_hw = (max(size, round(height * scale)), max(size, round(width * scale)))
        images = F.interpolate(images.float(), size=new_hw, mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
        images = images[..., top : top + size, left : left + size]
    mean, std = torch.as_tensor(mean).view(1, 3, 1, 1), torch.as_tensor(std).view(1, 3, 1, 1)
    return (images.float().clamp(0, 1) - mean.to(images.device)) / std.to(images.device)


class ClipConfig(StrictModel):
    """Which open_clip model to build."""

    model_name: str = "tiny-clip"
    # an open_clip pretrained tag, or a weights file at a local path or any fsspec URL; None: random init
    pretrained: Optional[str] = None


@dataclass
class TextEmbedding:
    """CLIP's view of a batch of texts."""

    text_embed: Tensor  # [B, D] unit norm
    text_encodings: Tensor  # [B, T, W] final-layer token features
    mask: Tensor  # [B, T] True at real tokens


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_WEIGHTS_BYTES = 16 << 30  # the largest open_clip checkpoints are under 10 GB: more is not a CLIP


def pretrained_weights(pretrained: Optional[str]) -> Optional[str]:
    """What open_clip gets as `pretrained`: a tag as it is; a weights file (a local path or any fsspec URL, so
    air-gapped clusters and mirrors work) as a checked local file: URLs copied once into the local cache
    (DALLE2_CACHE, else ~/.cache/dalle2), every pickle checked to hold tensors only before open_clip reads it."""
    import os

    from .checkpoint import exists, load_untrusted, read_bytes

    if pretrained is None or ("://" not in pretrained and not pretrained.endswith(WEIGHT_SUFFIXES)
                              and os.sep not in pretrained):
        return pretrained  # an open_clip tag ("openai", "laion2b_s34b_b79k"): open_clip resolves it
    what = f"CLIP pretrained weights {pretrained!r}"
    if "://" in pretrained and not pretrained.startswith("file://"):
        local = cached_copy(pretrained, what)
    else:
        local = os.path.expanduser(pretrained.removeprefix("file://"))
        if not exists(local):
            raise FileNotFoundError(f"{what}: no such file")
    if not local.endswith(".safetensors"):  # a pickle: refused here, by name, unless it is tensors only
        load_untrusted(read_bytes(local), what)
    return local


def cached_copy(url: str, what: str) -> str:
    """A local copy of a remote weights file, fetched once per URL (a partial fetch never counts: written under a
    temporary name and renamed whole)."""
    import hashlib
    import os

    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{what}: not found")
    info = fs.info(path)
    size = info.get("size")
    # keyed by URL, size and version (ETag or modification time, whichever the store gives): weights replaced at
    # the same URL, fine-tuned ones of the same size included, are fetched again
    version = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated")
                    if info.get(k) is not None), "")
    folder = os.path.join(os.environ.get("DALLE2_CACHE") or os.path.expanduser("~/.cache/dalle2"), "clip")
    name = url.rstrip("/").rsplit("/", 1)[-1] or "weights"
    local = os.path.join(folder, hashlib.sha256(f"{url}|{size}|{version}".encode()).hexdigest()[:16] + "-" + name)
    if os.path.exists(local):
        return local
    if size is not None and size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"{what}: {size} bytes, more than any CLIP's weights ({MAX_WEIGHTS_BYTES} at most)")
    os.makedirs(folder, exist_ok=True)
    partial, copied = f"{local}.partial-{os.getpid()}", 0
    try:
        with fs.open(path, "rb") as source, open(partial, "wb") as target:
            while chunk := source.read(1 << 24):  # streamed: a CLIP's gigabytes never sit in memory at once
                copied += len(chunk)
                if copied > MAX_WEIGHTS_BYTES:
                    raise ValueError(f"{what}: more than {MAX_WEIGHTS_BYTES} bytes, more than any CLIP's weights")
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        os.replace(partial, local)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    log.info("fetched %s to %s (%d bytes)", url, local, copied)
    return local


def build_open_clip(model_name: str, pretrained: Optional[str] = None) -> nn.Module:
    """An open_clip model by name; `pretrained` is an open_clip tag (open_clip downloads or reads its weights) or a
    weights file at a local path or fsspec URL (see pretrained_weights)."""
    import open_clip

    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {model_name!r}; open_clip knows: {', '.join(open_clip.list_models())}")
    # a tag trained with QuickGELU (OpenAI's weights: "openai") gets it, whichever model config the name selects;
    # open_clip itself only warns, and plain GELU shifts every embedding a little
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    return open_clip.create_model(model_name, pretrained=pretrained_weights(pretrained),
                                  force_quick_gelu=bool(tag.get("quick_gelu")))


class ClipAdapter(nn.Module):
    """Frozen open_clip model with the embedding calls the prior and decoder need."""

    def __init__(self, model_name: str = "tiny-clip", pretrained: Optional[str] = None, config: Optional[ClipConfig] = None):
        super().__init__()
        import open_clip

        self.config = config if config is not None else ClipConfig(model_name=model_name, pretrained=pretrained)
        self.model = build_open_clip(self.config.model_name, self.config.pretrained)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(self.config.model_name)
        preprocess = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(preprocess.get("mean", OPENAI_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.get("std", OPENAI_STD)).view(1, 3, 1, 1), persistent=False)

    # ---- sizes -----------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space."""
        return int(self.model.text_projection.shape[-1]) if isinstance(self.model.text_projection, Tensor) else int(
            self.model.text_projection.out_features
        )

    @property
    def text_encoding_dim(self) -> int:
        """Width of the per-token text features."""
        return int(self._text_tower.ln_final.normalized_shape[0])

    @property
    def max_text_len(self) -> int:
        return int(self._text_tower.context_length)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def _text_tower(self) -> nn.Module:
        # open_clip's CLIP keeps the text tower's parts on the model itself; CustomTextCLIP under `.text`.
        return getattr(self.model, "text", self.model)

    # ---- text ------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids [B, context_length], padded with 0; works offline."""
        if isinstance(texts, str):
            raise TypeError("pass a list of strings, not one string")
        return self.tokenizer(list(texts)).to(self.mean.device)

    @torch.no_grad()
    def embed_text(self, text: Union[Sequence[str], Tensor], trim_padding: bool = False) -> TextEmbedding:
        """Unit-norm text embeds, per-token encodings and their mask, for strings or token ids.

        With `trim_padding`, the padding after the batch's longest caption is not computed: attention is causal,
        so no token sees a later one and the embeds are the same (encodings then stop at that length)."""
        tokens = text.to(self.mean.device) if isinstance(text, Tensor) else self.tokenize(text)
        tower = self._text_tower
        if not hasattr(tower, "token_embedding"):
            raise NotImplementedError(f"{self.config.model_name}: text encodings need an open_clip text transformer")
        pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if pool_type != "argmax":  # e.g. MetaCLIP 2's "eos" with an HF tokenizer: pooled elsewhere, padded with another id
            raise NotImplementedError(f"{self.config.model_name}: its text tower pools by {pool_type!r}; only "
                                      "open_clip's argmax (end-of-text token) pooling is supported")
        if getattr(tower, "cls_emb", None) is not None:  # CoCa: its embeds pool a token appended after the text
            raise NotImplementedError(f"{self.config.model_name}: its text tower pools a CLS token it appends (CoCa); "
                                      "only open_clip's argmax (end-of-text token) pooling is supported")
        attn_mask = tower.attn_mask
        if trim_padding and attn_mask is not None and tokens.shape[0]:
            length = int(tokens.argmax(dim=-1).max()) + 1  # the last end-of-text token (the highest id) of the batch
            tokens, attn_mask = tokens[:, :length], attn_mask[:length, :length]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[: tokens.shape[1]].to(cast_dtype)
        x = tower.transformer(x, attn_mask=attn_mask)
        encodings = tower.ln_final(x)
        # The pooled token is the end-of-text one (the highest id), as open_clip's own encode_text does.
        pooled = encodings[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)]
        projection = tower.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection
        return TextEmbedding(F.normalize(pooled.float(), dim=-1), encodings.float(), tokens != 0)

    # ---- images ----------------------------------------------------------------------------------

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] floats in [0, 1] -> the model's input: shortest side resized, centre-cropped, normalised."""
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def embed_image(self, images: Tensor) -> Tensor:
        """Unit-norm image embeds [B, D] of images in [0, 1] of any size."""
        pixels = self.preprocess(images.to(self.mean.device))
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def embed_preprocessed(self, pixels: Tensor) -> Tensor:
        """Unit-norm image embeds of already preprocessed pixels (the embed stage decodes on CPU first)."""
        with torch.no_grad():
            return F.normalize(self.model.encode_image(pixels.to(self.mean.device)).float(), dim=-1)

    # ---- persistence -----------------------------------------------------------------------------

    def save(self, root: str, storage_options: Optional[dict] = None) -> None:
        """Save the open_clip weights and the config to the folder `root` (any fsspec URL)."""
        save_checkpoint(root, trainable_state(self.model), self.checkpoint_config(), storage_options=storage_options)

    def checkpoint_config(self) -> dict:
        """The config stored with (and checked against) saved weights."""
        # The weights are in the checkpoint, so a reload builds the architecture without `pretrained`.
        return ClipConfig(model_name=self.config.model_name).model_dump(mode="json")

    @classmethod
    def from_checkpoint(cls, root: str, storage_options: Optional[dict] = None) -> "ClipAdapter":
        """Rebuild the model named in the checkpoint and load its weights."""
        config = ClipConfig(**load_state(root, storage_options)["config"])
        adapter = cls(config=config)
        load_checkpoint(root, adapter.model, adapter.checkpoint_config(), storage_options)
        return adapter


def load_clip(model_name: str = "tiny-clip", pretrained: Optional[str] = None, checkpoint: Optional[str] = None,
              storage_options: Optional[dict] = None) -> ClipAdapter:
    """A ClipAdapter from a checkpoint folder when given, else from an open_clip name (and pretrained tag)."""
    if checkpoint:
        return ClipAdapter.from_checkpoint(checkpoint, storage_options)
    return ClipAdapter(model_name, pretrained)


def checkpoint_model_name(checkpoint: str, storage_options: Optional[dict] = None) -> str:
    """The open_clip architecture a CLIP checkpoint was saved from."""
    return ClipConfig(**load_state(checkpoint, storage_options)["config"]).model_name
