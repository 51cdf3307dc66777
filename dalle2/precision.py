"""Mixed precision: one autocast for training and embedding, that never picks a path slower than float32."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)  # asked at every training step; the answer is the machine's
def cpu_has_native(amp: str) -> bool:
    """Whether this CPU computes `amp` ('bf16' or 'fp16') natively (oneDNN: AVX512-BF16/AMX, AVX512-FP16)."""
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[amp]
    try:
        return bool(torch.backends.mkldnn.is_available() and getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch without the check: assume the slow path
        return False


@functools.lru_cache(maxsize=None)
def _warn_float32(amp: str) -> None:
    log.warning("autocast %s: this CPU has no native %s math (torch falls back to a reference matmul about 100x "
                "slower than float32 here), so it runs in float32; set amp/autocast to 'none' to silence this",
                amp, amp)


def autocast_context(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on `device`, or nothing: for 'none', and on a CPU without native math for that type."""
    device = torch.device(device)
    if amp == "none":
        return contextlib.nullcontext()
    if device.type == "cpu" and not cpu_has_native(amp):
        _warn_float32(amp)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[amp])
