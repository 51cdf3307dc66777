"""Checkpoints on any fsspec path: weights as safetensors, the rest as a `weights_only` torch file.

Layout of a checkpoint folder:
    model.safetensors      trained weights
    ema.safetensors        EMA weights (trainers only)
    state.pt               step, optimizer/scaler/scheduler states, config, package version
    COMPLETE               written last: the step and every file's size and sha256 (JSON)

A folder without COMPLETE, or whose files do not match it, is never loaded (a save cut short by a crash leaves
files that look whole: `state.pt` written in place could be half there). Local files are written under a
temporary name, fsynced and renamed (`dalle2.durable.write_atomic`), so a name is whole or absent.
Checkpoints saved before markers existed are refused by name; `python -m dalle2.checkpoint DIR` marks one
you trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import fsspec

from .configs import config_diff

if TYPE_CHECKING:
    import torch
    from torch import nn
# torch and safetensors are imported where weights are read or written: `dalle2 status`, which only checks
# markers and sizes, runs without them (about 1.6 s a process)

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
COMPLETE_FILE = "COMPLETE"
MAX_MARKER_BYTES = 1 << 20  # a marker lists a few files: anything bigger is not one of ours


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint folder without its COMPLETE marker, or whose files do not match it."""


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
    return as_saved(trainable_entries(module.state_dict(), prefixes))


def trainable_entries(state: dict[str, torch.Tensor], prefixes: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """The entries of a state dict `trainable_state` keeps (the tensors themselves)."""
    return {k: v for k, v in state.items()
            if not k.startswith("clip.") and (prefixes is None or k.startswith(tuple(prefixes)))}


def as_saved(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies, as safetensors writes them (never the live tensors training goes on changing)."""
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def write_bytes(url: str, data: bytes, storage_options: Optional[dict] = None) -> None:
    """Write a whole file: local ones under a temporary name, fsynced, then renamed; others in one PUT."""
    if "://" not in url or url.startswith("file://"):
        from dalle2.durable import write_atomic  # the project's one durable local write

        write_atomic(url, data)
        return
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


# the lines of torch's weights_only error that say nothing about the file at hand
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")


def load_untrusted(data: bytes, name: str, allowed: Sequence[Any] = ()) -> Any:
    """`torch.load` of bytes from outside with weights_only=True: tensors and plain containers (and the `allowed`
    classes) only. Anything else is refused before it is built, naming what the file holds: never unpickled."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        text = str(error)
        # torch words it "Unsupported global: GLOBAL x.y ..." or "Trying to load unsupported GLOBAL x.y ..."
        found = re.search(r"((?:Trying to load unsupported )?GLOBAL [\w.]+[^\n.]*)", text)
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(_TORCH_BOILERPLATE)]
        reason = found.group(1) if found else f"{type(error).__name__}: {lines[0] if lines else 'unreadable'}"
        raise ValueError(f"{name} cannot be loaded with weights_only=True, so it is refused (never unpickled): "
                         f"{reason}") from None


def load_tensors(url: str, what: str) -> dict[str, torch.Tensor]:
    """A flat dict of tensors (a state dict) from a safetensors or weights-only torch file at a path or fsspec URL."""
    if not exists(url):
        raise FileNotFoundError(f"{what} {url!r} not found")
    data = read_bytes(url)
    if url.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    import torch

    state = load_untrusted(data, f"{what} {url!r}")
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise ValueError(f"{what} {url!r} are not a flat dict of tensors (a state dict)")
    return state


def marker_bytes(files: dict[str, bytes], step: Optional[int]) -> bytes:
    """The COMPLETE marker of a checkpoint made of `files` (name -> bytes)."""
    listed = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    return json.dumps({"step": step, "version": package_version(), "files": listed}, indent=1, sort_keys=True).encode()


def read_marker(root: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The COMPLETE marker of the folder `root`, or None when it has none (raises naming a marker that is not ours)."""
    url = _join(root, COMPLETE_FILE)
    if not exists(url, storage_options):
        return None
    data = read_bytes(url, storage_options)
    try:
        marker = json.loads(data) if len(data) <= MAX_MARKER_BYTES else None
        files = marker["files"]
        if not all(isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) for v in files.values()):
            raise ValueError("files without bytes and sha256")
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise IncompleteCheckpointError(f"checkpoint {root}: {COMPLETE_FILE} is not a checkpoint marker ({error})") from error
    return marker


def incomplete_reason(root: str, storage_options: Optional[dict] = None) -> Optional[str]:
    """Why the folder `root` is not a complete checkpoint (None when it is): no marker, or a listed file missing or
    of another size (one listing; the sha256 of each file is checked when it is read)."""
    if not exists(root, storage_options):
        return "the folder does not exist"
    try:
        marker = read_marker(root, storage_options)
    except IncompleteCheckpointError as error:
        return str(error)
    if marker is None:
        return (f"its {COMPLETE_FILE} marker is missing (the save was cut short, or it was saved before markers "
                f"existed: `python -m dalle2.checkpoint {root}` marks one you trust)")
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    fs.invalidate_cache()
    sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size") for entry in fs.ls(path, detail=True)}
    for name, listed in sorted(marker["files"].items()):
        if sizes.get(name) != listed["bytes"]:
            found = "missing" if name not in sizes else f"{sizes[name]} bytes"
            return f"{name} is {found}, its {COMPLETE_FILE} marker says {listed['bytes']} bytes"
    return None


def require_complete(root: str, storage_options: Optional[dict] = None) -> dict:
    """The marker of a complete checkpoint at `root`; raises IncompleteCheckpointError naming the folder otherwise."""
    reason = incomplete_reason(root, storage_options)
    if reason:
        raise IncompleteCheckpointError(f"checkpoint {root} is incomplete: {reason}")
    return read_marker(root, storage_options)


def _read_checked(root: str, name: str, marker: dict, storage_options: Optional[dict]) -> bytes:
    """A file of a complete checkpoint, its sha256 checked against the marker."""
    listed = marker["files"].get(name)
    if listed is None:
        raise IncompleteCheckpointError(f"checkpoint {root}: {name} is not in its {COMPLETE_FILE} marker")
    data = read_bytes(_join(root, name), storage_options)
    if hashlib.sha256(data).hexdigest() != listed["sha256"]:
        raise IncompleteCheckpointError(f"checkpoint {root}: {name} does not match the sha256 in its {COMPLETE_FILE} marker")
    return data


def mark_complete(root: str, storage_options: Optional[dict] = None) -> None:
    """Write the COMPLETE marker of an existing folder (a checkpoint saved before markers, that you trust)."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    files = {n: read_bytes(_join(root, n), storage_options) for n in (MODEL_FILE, EMA_FILE, STATE_FILE) if n in names}
    if STATE_FILE not in files or MODEL_FILE not in files:
        raise FileNotFoundError(f"{root} has no {MODEL_FILE} and {STATE_FILE}: not a checkpoint")
    import torch

    step = torch.load(io.BytesIO(files[STATE_FILE]), map_location="cpu", weights_only=True).get("steps")
    write_bytes(_join(root, COMPLETE_FILE), marker_bytes(files, sum(step) if step else None), storage_options)


def save_checkpoint(
    root: str,
    weights: dict[str, torch.Tensor],
    config: dict,
    ema: Optional[dict[str, torch.Tensor]] = None,
    state: Optional[dict[str, Any]] = None,
    storage_options: Optional[dict] = None,
) -> None:
    """Save weights (a state dict, see `trainable_state`) and state to the folder `root` (local or remote); the
    COMPLETE marker goes last, after every file is whole (a marker from an earlier save there goes first)."""
    import torch
    from safetensors.torch import save as save_safetensors

    from dalle2.faults import crash_point

    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    if fs.exists(_join(path, COMPLETE_FILE)):
        fs.rm(_join(path, COMPLETE_FILE))  # overwriting a checkpoint: it is incomplete until the new marker
    files = {MODEL_FILE: save_safetensors(weights)}
    if ema is not None:
        files[EMA_FILE] = save_safetensors({k: v.contiguous() for k, v in ema.items()})
    buffer = io.BytesIO()
    torch.save({**(state or {}), "config": config, "version": package_version()}, buffer)
    files[STATE_FILE] = buffer.getvalue()
    for name, data in files.items():
        write_bytes(_join(root, name), data, storage_options)
    crash_point("checkpoint.before_marker")  # every file whole, no marker: never taken as a checkpoint
    steps = (state or {}).get("steps")
    write_bytes(_join(root, COMPLETE_FILE), marker_bytes(files, sum(steps) if steps else None), storage_options)
    log.info("saved checkpoint to %s", root)


def load_state(root: str, storage_options: Optional[dict] = None) -> dict[str, Any]:
    """The non-weight part of a complete checkpoint, unpickled with `weights_only=True`."""
    marker = require_complete(root, storage_options)
    data = _read_checked(root, STATE_FILE, marker, storage_options)
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_weights(root: str, name: str = MODEL_FILE, storage_options: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """A safetensors file of a complete checkpoint as a state dict."""
    from safetensors.torch import load as load_safetensors

    marker = require_complete(root, storage_options)
    return load_safetensors(_read_checked(root, name, marker, storage_options))


def check_config(saved: dict, current: dict, root: str) -> None:
    """Raise ConfigMismatchError naming every differing field."""
    diffs = config_diff(saved, current)
    if diffs:
        raise ConfigMismatchError(f"checkpoint {root} was saved with a different config: " + "; ".join(diffs))


def load_checkpoint(
    root: str, model: nn.Module, config: dict, storage_options: Optional[dict] = None, use_ema: bool = False,
    prepare: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None,
) -> dict[str, Any]:
    """Load weights into `model` after checking its config; returns the state dict of the checkpoint.
    `prepare` turns the file's whole tensors into what the model holds (a sharded trainer's shards).

    A trainer's checkpoint holds only the parts it trained (`state["parts"]`, state-dict prefixes): the
    model's other weights are left as they are, and the caller reads `parts` to know what was loaded.
    """
    state = load_state(root, storage_options)
    check_config(state["config"], config, root)
    name = EMA_FILE if use_ema and exists(_join(root, EMA_FILE), storage_options) else MODEL_FILE
    weights = load_weights(root, name, storage_options)
    missing, unexpected = model.load_state_dict(prepare(weights) if prepare else weights, strict=False)
    saved = tuple(state.get("parts") or ("",))
    missing = [k for k in missing if not k.startswith("clip.") and k.startswith(saved)]
    if missing or unexpected:
        raise ConfigMismatchError(f"checkpoint {root} does not fit the model: missing {missing}, unexpected {unexpected}")
    return state


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dalle2.checkpoint CHECKPOINT_DIR   (writes its COMPLETE marker: a checkpoint "
                 "saved before markers existed, that you trust)")
    mark_complete(sys.argv[1])
    log.info("marked %s complete", sys.argv[1])
