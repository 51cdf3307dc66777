"""Data parallelism for a trainer's parts on several processes (Ray Train's workers): `ddp` replicates each part in
DistributedDataParallel; `fsdp` shards its parameters, gradients and optimizer state over the ranks with FSDP2's
`fully_shard`, for a unet that does not fit one device.

Checkpoints hold whole tensors either way (gathered from the shards on save, cut to this rank's shard on load),
so a run saved by 2 sharded workers resumes on 1, on 4, or replicated.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any, Iterator, Literal, Optional

import torch
from torch import Tensor, nn

Parallel = Literal["ddp", "fsdp"]


def world_size() -> int:
    """Processes of the default process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class PartLoss(nn.Module):
    """The loss of one part as a module whose parameters are that part's: what DistributedDataParallel wraps, so
    it all-reduces the trained part's gradients only (not a frozen CLIP's, not another stage's unet)."""

    def __init__(self, trainer: Any, index: int):  # a DiffusionTrainer (which imports this module)
        super().__init__()
        self.part, self.index = trainer.parts[index], index
        # weak: the trainer holds this module's DistributedDataParallel, which must go with the trainer (before the
        # process group is destroyed), not whenever the garbage collector next breaks a cycle
        self.compute_loss = weakref.WeakMethod(trainer.compute_loss)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.compute_loss()(batch, part=self.index)


def data_parallel(loss: PartLoss, device: torch.device) -> Optional[nn.Module]:
    """`loss` in DistributedDataParallel when torch.distributed runs on several processes, else None."""
    if world_size() == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    # unused parameters: a unet's layers a batch does not reach; buffers are the model's own, never rank-specific
    # (torch 2.13 renamed broadcast_buffers, which it deprecates)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(loss, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, **no_buffer_sync)


def shard(part: nn.Module) -> int:
    """Shard `part` over the ranks with `fully_shard`: each block (a member of a ModuleList that holds no list of
    its own: a resnet, an attention, a transformer layer) is one unit, gathered just before it runs and freed
    after, and the part's remaining parameters are one more. Returns the blocks sharded."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # an attention block returns its tokens reshaped (a view) and nothing modifies it in place: nothing to warn of
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    lists = [m for m in part.modules() if isinstance(m, nn.ModuleList)]
    blocks = [block for members in lists for block in members
              if not any(isinstance(m, nn.ModuleList) for m in block.modules())
              and next(block.parameters(), None) is not None]
    for block in blocks:
        fully_shard(block)
    fully_shard(part)
    return len(blocks)


def sharded_modules(part: nn.Module) -> list[nn.Module]:
    """The FSDP units inside `part` (none when it is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in part.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(part: nn.Module, on: bool) -> None:
    """Whether the next backward pass reduce-scatters `part`'s gradients (off: they accumulate unsharded, as
    DDP's no_sync)."""
    part.set_requires_gradient_sync(on)


def same_passes(passes: int) -> None:
    """Raise unless every rank makes `passes` forward passes this step: a sharded rank gathers each block from all
    ranks in every pass, so one extra pass would wait for ever. (The loaders give every rank as many rows; a
    `max_batch_size` that splits them is the same on all.)"""
    import torch.distributed as dist

    counts = torch.tensor([passes, -passes])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if counts[0] != -counts[1]:
        raise ValueError(f"parallel='fsdp': rank {rank()} makes {passes} forward passes this step, another "
                         f"{counts[0] if counts[0] != passes else -counts[1]}: give every rank as many rows per batch")


@contextlib.contextmanager
def gathered(parts: list[nn.Module]) -> Iterator[None]:
    """Every sharded part's whole parameters on every rank, kept between forward passes: sampling then runs
    hundreds of forwards with no communication, so ranks may sample different numbers of rows. A collective:
    every rank enters it together."""
    units = [unit for part in parts for unit in sharded_modules(part)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # every unit reshards after its forward from here on, the part's root one too (FSDP2 otherwise keeps
            # the root whole until its backward: its few parameters are gathered once more a step). Restoring
            # FSDP2's own root setting instead diverged between ranks: a rank that sampled nothing initialises its
            # root at the next training step, with other settings than one that did, and their gathers mismatch.
            unit.set_reshard_after_forward(True, recurse=False)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise): in-place updates without
    communication."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(value: Any, keep: bool = True) -> Any:
    """`value` with every sharded tensor gathered whole, inside dicts and lists (a collective on sharded ones:
    every rank calls it on the same structure). One tensor at a time: with `keep` False (a rank that writes
    nothing) each is dropped once gathered, and kept ones go to the CPU, so no device holds a whole model."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        full = value.full_tensor()
        return full.cpu() if keep else None
    if isinstance(value, dict):
        return {k: whole(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(whole(v, keep) for v in value)
    return value


def shard_like(value: Tensor, like: Any) -> Tensor:
    """A whole tensor cut to this rank's shard as `like` is sharded (cut locally: every rank read the same file);
    `value` itself when `like` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_state(weights: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """A whole state dict (from a checkpoint) as `module`'s own: its sharded entries cut to this rank's shards."""
    live = module.state_dict()
    return {k: shard_like(v, live.get(k)) for k, v in weights.items()}


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state dict (from a checkpoint) cut to the shards of the optimizer's parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {index: {k: shard_like(v, params[index]) if k != "step" and torch.is_tensor(v) else v
                         for k, v in values.items()}
                 for index, values in state["state"].items()}
    return {**state, "state": per_param}
