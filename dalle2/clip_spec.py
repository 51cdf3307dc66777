"""What a driver needs to know of an open_clip architecture (input size, normalisation, embedding width), read
from its JSON config: ours in dalle2/model_configs/clip, then open_clip's own files. Neither open_clip nor
torch is imported for a name found there (importing them costs a planning driver seconds)."""

from __future__ import annotations

import functools
import importlib.util
import json
from importlib import resources
from pathlib import Path

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip requires of a model config file


def clip_model_config(model_name: str) -> dict:
    """The architecture's config, as open_clip.get_model_config returns it."""
    folders = [resources.files("dalle2") / "model_configs" / "clip"]
    spec = importlib.util.find_spec("open_clip")  # finds the package without running it
    folders += [Path(location) / "model_configs" for location in (spec.submodule_search_locations or [])] if spec else []
    for folder in folders:
        # names are matched exactly, as open_clip's registry does (no path tricks, no case folding on macOS)
        path = next((p for p in folder.iterdir() if p.name == f"{model_name}.json"), None) if folder.is_dir() else None
        if path is not None:
            config = json.loads(path.read_text())
            if all(key in config for key in CONFIG_KEYS):
                return config
    # hf-hub: and local-dir: names, or configs added at run time: open_clip's own lookup
    import open_clip

    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown CLIP model {model_name!r}")
    return config


@functools.lru_cache(maxsize=None)
def register_model_configs() -> None:
    """Make the architectures in dalle2/model_configs/clip known to open_clip (once per process)."""
    import open_clip

    folder = resources.files("dalle2") / "model_configs" / "clip"
    open_clip.add_model_config(str(folder))


def clip_input_spec(model_name: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(image_size, mean, std) of an open_clip model."""
    config = clip_model_config(model_name)
    size = config["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    preprocess = config.get("preprocess_cfg", {})
    return int(size), tuple(preprocess.get("mean", OPENAI_MEAN)), tuple(preprocess.get("std", OPENAI_STD))


def text_tower_unsupported(model_name: str) -> str | None:
    """Why ClipAdapter.embed_text cannot embed this architecture's captions, or None."""
    # it runs open_clip's own text transformer and pools its end-of-text token: open_clip's CLIP models, not
    # SigLIP (last token), MetaCLIP 2 (eos), CoCa (an appended CLS) or Hugging Face text towers
    text = clip_model_config(model_name).get("text_cfg", {})
    if "hf_model_name" in text:
        return f"its text tower is a Hugging Face model ({text['hf_model_name']})"
    if text.get("pool_type", "argmax") != "argmax":
        return f"its text tower pools by {text['pool_type']!r}"
    if text.get("embed_cls"):
        return "its text tower pools a CLS token it appends (CoCa)"
    return None
