"""The embed stage's CLIP actor: image and caption embeddings of the decoded samples (rows.py's sample stream)."""

from __future__ import annotations

import threading
import time
from typing import Optional

import numpy as np

from pipeline.run.config import ClipSource
from pipeline.stages.embed.rows import CAPTION, EMBEDDED_AT, ERROR, IMG_EMB, LOADED_AT, PIXELS, TEXT_EMB, samples

# batches a CLIP actor works on at once: one tokenizes its captions (Python: a fifth of a tiny CLIP's time on CPU,
# measured) while the other runs the model, which runs one batch at a time (ClipEmbedder.model_lock), so a GPU holds
# one batch of activations; Ray Data then queues up to twice as many blocks an actor (in the object store)
ACTOR_CALLS = 2


class ClipEmbedder:
    """Ray Data actor: loads CLIP once, embeds batches of uint8 pixels and captions; thread-safe (ACTOR_CALLS).
    Only samples without an error are embedded; the other rows (END, FAILED) pass through with zeros."""

    def __init__(self, source: dict, use_gpu: bool, autocast: str, output_dtype: str, torch_threads: Optional[int] = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from dalle2.clip import load_clip

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.clip = load_clip(**ClipSource(**source).model_dump()).to(self.device).eval()
        self.autocast, self.output_dtype = autocast, np.dtype(output_dtype)
        self.model_lock = threading.Lock()
        self.loaded_at = time.time()  # for the stage's start-up figures

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from einops import rearrange

        from dalle2.clip import clip_preprocess
        from dalle2.precision import autocast_context

        ok = samples(batch) & np.asarray([not e for e in batch[ERROR]], dtype=bool)
        dim = self.clip.embed_dim
        img_emb = np.zeros((len(ok), dim), dtype=self.output_dtype)
        text_emb = np.zeros((len(ok), dim), dtype=self.output_dtype)
        if ok.any():
            with torch.inference_mode(), autocast_context(self.device, self.autocast):
                # outside the lock, beside the other call's forward: the tokenizer, and the uint8 [B, H, W, 3]
                # pixels from the decode tasks
                tokens = self.clip.tokenize([str(c) for c in batch[CAPTION][ok]])
                pixels = torch.from_numpy(np.ascontiguousarray(batch[PIXELS][ok])).to(self.device)
                with self.model_lock:  # scaled and normalised on the actor's device
                    pixels = rearrange(pixels, "b h w c -> b c h w").float() / 255
                    pixels = clip_preprocess(pixels, self.clip.image_size, self.clip.mean, self.clip.std)
                    img_emb[ok] = self.clip.embed_preprocessed(pixels).float().cpu().numpy()
                    text_emb[ok] = self.clip.embed_text(tokens, trim_padding=True).text_embed.float().cpu().numpy()
        # NaN / inf (a broken model, or float16 overflow) must never reach reorder or training
        finite = np.isfinite(img_emb).all(axis=1) & np.isfinite(text_emb).all(axis=1)
        errors = np.asarray([e if (e or finite[i]) else "non-finite embedding" for i, e in enumerate(batch[ERROR])],
                            dtype=object)
        img_emb[~finite], text_emb[~finite] = 0, 0
        out = {k: v for k, v in batch.items() if k != PIXELS}
        out[ERROR] = errors
        out[IMG_EMB], out[TEXT_EMB] = img_emb, text_emb
        # when, for the stage's start-up and steady-rate figures (a write task's block mixes CLIP batches)
        out[EMBEDDED_AT] = np.full(len(ok), time.time())
        out[LOADED_AT] = np.full(len(ok), self.loaded_at)
        return out
