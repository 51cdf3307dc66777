"""Search a run's training rows by text or by image through its data index (`dalle2 index`), with the run's CLIP:
the command line's `dalle2 index --query` and the service's search alike."""

from __future__ import annotations

from typing import Optional


class RunSearch:
    """A run's data index, its CLIP (the one that embedded the rows) and its shards' images, loaded once."""

    def __init__(self, root: str, device: str = "cpu", clip=None):
        """`clip`: the run's CLIP when the caller has it loaded already (the service's DALLE2 holds it)."""
        from pipeline.stages.index import DataIndex, ShardImages

        from .checkpoints import run_clip
        from .run_config import load_run_config

        self.index = DataIndex(root)
        self.images = ShardImages(root)
        self.clip = clip if clip is not None else run_clip(load_run_config(root)).to(device).eval()
        if self.clip.embed_dim != self.index.summary["dim"]:
            raise ValueError(f"{root}: the index holds {self.index.summary['dim']}-wide embeddings but the run's CLIP "
                             f"embeds to {self.clip.embed_dim}: rebuild it with `dalle2 index`")

    def by_text(self, texts: list[str], k: int = 8) -> list[list]:
        """The `k` training rows nearest each text (CLIP text embedding against the rows' image embeddings)."""
        return self.index.search(self.clip.embed_text(texts).text_embed.cpu().numpy(), k)

    def by_image(self, images, k: int = 8) -> list[list]:
        """The `k` training rows nearest each image [B, 3, H, W] in [0, 1]."""
        return self.index.search(self.clip.embed_image(images).cpu().numpy(), k)

    def image(self, hit) -> Optional[bytes]:
        """A hit's encoded image from its shard (None if the shard no longer holds it)."""
        return self.images.image(hit.shard, hit.key)
