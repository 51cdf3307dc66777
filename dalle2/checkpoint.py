"""Checkpoints on any fsspec path: weights as safetensors, the rest as a `weights_only` torch file.

Layout of a checkpoint folder:
    model.safetensors      trained weights
    ema.safetensors        EMA weights (trainers only)
    state.pt               step, optimizer/scaler/scheduler states, config, package version (written last:
                           its presence marks the checkpoint complete)
"""

from __future__ import annotations

import io
import logging
from typing import Any, Optional, Sequence

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .configs import config_diff

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"


class ConfigMismatchError(ValueError):
    """A checkpoint was saved from a model built with a different config."""


def package_version() -> str:
    from . import __version__

    return __version__


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def trainable_state(module: nn.Module, prefixes: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """The module's state dict without frozen CLIP weights (and only under `prefixes` when given: the parts a
    trainer optimised, so untrained unets are never saved as if trained); contiguous copies for safetensors."""
    state = {k: v for k, v in module.state_dict().items()
             if not k.startswith("clip.") and (prefixes is None or k.startswith(tuple(prefixes)))}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def write_bytes(url: str, data: bytes, storage_options: Optional[dict] = None) -> None:
    """Write a whole file through fsspec."""
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(data)


def read_bytes(url: str, storage_options: Optional[dict] = None) -> bytes:
    """Read a whole file through fsspec."""
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def exists(url: str, storage_options: Optional[dict] = None) -> bool:
    """Whether an fsspec URL exists."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(path)


def save_checkpoint(
    root: str,
    weights: dict[str, torch.Tensor],
    config: dict,
    ema: Optional[dict[str, torch.Tensor]] = None,
    state: Optional[dict[str, Any]] = None,
    storage_options: Optional[dict] = None,
) -> None:
    """Save weights (a state dict, see `trainable_state`) and state to the folder `root` (local or remote)."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    write_bytes(_join(root, MODEL_FILE), save_safetensors(weights), storage_options)
    if ema is not None:
        write_bytes(_join(root, EMA_FILE), save_safetensors({k: v.contiguous() for k, v in ema.items()}), storage_options)
    buffer = io.BytesIO()
    torch.save({**(state or {}), "config": config, "version": package_version()}, buffer)
    write_bytes(_join(root, STATE_FILE), buffer.getvalue(), storage_options)
    log.info("saved checkpoint to %s", root)


def load_state(root: str, storage_options: Optional[dict] = None) -> dict[str, Any]:
    """The non-weight part of a checkpoint, unpickled with `weights_only=True`."""
    url = _join(root, STATE_FILE)
    if not exists(url, storage_options):
        raise FileNotFoundError(f"no complete checkpoint at {root} ({STATE_FILE} is missing)")
    return torch.load(io.BytesIO(read_bytes(url, storage_options)), map_location="cpu", weights_only=True)


def load_weights(root: str, name: str = MODEL_FILE, storage_options: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """A safetensors file of the checkpoint as a state dict."""
    return load_safetensors(read_bytes(_join(root, name), storage_options))


def check_config(saved: dict, current: dict, root: str) -> None:
    """Raise ConfigMismatchError naming every differing field."""
    diffs = config_diff(saved, current)
    if diffs:
        raise ConfigMismatchError(f"checkpoint {root} was saved with a different config: " + "; ".join(diffs))


def load_checkpoint(
    root: str, model: nn.Module, config: dict, storage_options: Optional[dict] = None, use_ema: bool = False
) -> dict[str, Any]:
    """Load weights into `model` after checking its config; returns the state dict of the checkpoint.

    A trainer's checkpoint holds only the parts it trained (`state["parts"]`, state-dict prefixes): the
    model's other weights are left as they are, and the caller reads `parts` to know what was loaded.
    """
    state = load_state(root, storage_options)
    check_config(state["config"], config, root)
    name = EMA_FILE if use_ema and exists(_join(root, EMA_FILE), storage_options) else MODEL_FILE
    weights = load_weights(root, name, storage_options)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    saved = tuple(state.get("parts") or ("",))
    missing = [k for k in missing if not k.startswith("clip.") and k.startswith(saved)]
    if missing or unexpected:
        raise ConfigMismatchError(f"checkpoint {root} does not fit the model: missing {missing}, unexpected {unexpected}")
    return state
