"""DALL-E 2 in PyTorch: CLIP through open_clip, the diffusion prior, the U-Net decoder cascade.

Public names are imported on first use (PEP 562), so `import dalle2.configs` in a light worker
process does not pay for torch, torchvision and open_clip.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ClipAdapter": "clip", "ClipConfig": "clip",
    "DecoderConfig": "configs", "DiffusionConfig": "configs", "PriorConfig": "configs",
    "PriorNetworkConfig": "configs", "TrainerConfig": "trainer_config", "UnetConfig": "configs",
    "Decoder": "decoder", "GaussianDiffusion": "diffusion",
    "DiffusionPrior": "prior", "DiffusionPriorNetwork": "prior",
    "DALLE2": "text_to_image", "to_pil": "text_to_image",
    "DecoderTrainer": "trainer", "PriorTrainer": "trainer",
    "Unet": "unet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dalle2' has no attribute {name!r}")
