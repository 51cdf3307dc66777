"""Training's random draws per sample (timestep, noise, dropped conditioning, crops), each from a generator seeded
by the sample itself: the same sample gets the same draws however the batch is split over ranks or micro-batches,
so 1 and N data-parallel workers train alike on the same samples."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
from torch import Tensor


def sample_seeds(keys: Sequence[str], seed: int, epoch: int) -> Tensor:
    """One 63-bit seed per sample key, new each epoch and for each job seed ([B] int64)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest(),
                                        "little") >> 1 for key in keys], dtype=torch.int64)


class RowRandom:
    """Draws of shape [B, *shape]: row i from its own generator (seeds given), or all from torch's global one."""

    def __init__(self, batch: int, device: torch.device | str, seeds: Optional[Tensor] = None):
        if seeds is not None and len(seeds) != batch:
            raise ValueError(f"seeds has {len(seeds)} entries for a batch of {batch}")
        self.batch, self.device = batch, torch.device(device)
        self.generators = None if seeds is None else [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]

    def _draw(self, draw, shape: tuple[int, ...]) -> Tensor:
        """draw(size, generator=..., device=...) for the whole batch, or row by row from each row's generator."""
        if self.generators is None:
            return draw((self.batch, *shape), generator=None, device=self.device)
        # drawn on the CPU, where a generator's stream is the same on every machine
        return torch.stack([draw(shape, generator=g, device="cpu") for g in self.generators]).to(self.device)

    def rand(self, *shape: int) -> Tensor:
        """Uniform in [0, 1)."""
        return self._draw(torch.rand, shape)

    def randn(self, *shape: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Standard normal."""
        return self._draw(lambda size, **kw: torch.randn(size, dtype=dtype, **kw), shape)

    def randint(self, high: int, *shape: int) -> Tensor:
        """Integers in [0, high) (int64)."""
        return self._draw(lambda size, **kw: torch.randint(0, high, size, dtype=torch.long, **kw), shape)

    def uniform(self, low: float, high: float, *shape: int) -> Tensor:
        """Uniform in [low, high)."""
        return low + (high - low) * self.rand(*shape)
