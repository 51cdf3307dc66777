"""Trainers for the prior and the decoder: AdamW with warmup, clipping, EMA, autocast, accumulation.

A trainer optimises one or more *parts* of a model, each with its own optimizer, schedule and EMA:
the prior has one part (its network), the decoder one per U-Net, so each stage of the cascade is
trained on its own. Samples come from the EMA weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import (EMA_FILE, as_saved, exists, load_checkpoint, load_weights, save_checkpoint,
                         trainable_entries)
from .trainer_config import TrainerConfig
from .layers import set_gradient_checkpointing
from .lr_schedules import lr_multiplier
from .parallel import (Parallel, PartLoss, data_parallel, gathered, local, rank, same_passes, set_gradient_sync, shard,
                       shard_like, shard_optimizer_state, shard_state, whole, world_size)
from .precision import autocast_context

log = logging.getLogger(__name__)


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, beta: float = 0.99, update_after_step: int = 0, update_every: int = 1):
        self.beta, self.update_after_step, self.update_every = beta, update_after_step, update_every
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Blend the module's current weights into the average (a plain copy before `update_after_step`)."""
        if step % self.update_every:
            return
        beta = 0.0 if step <= self.update_after_step else self.beta
        # each rank averages its own shard of a sharded part
        pairs = [(local(self.shadow[k]), local(v.detach())) for k, v in module.state_dict().items() if k in self.shadow]
        same = [(s, v) for s, v in pairs if s.dtype == v.dtype and s.device == v.device]
        if same:  # one fused kernel over all tensors instead of a lerp per tensor
            torch._foreach_lerp_([s for s, _ in same], [v for _, v in same], 1 - beta)
        for shadow, value in pairs:
            if shadow.dtype != value.dtype or shadow.device != value.device:
                shadow.lerp_(value.to(device=shadow.device, dtype=shadow.dtype), 1 - beta)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `module` (each rank its shard of a sharded part)."""
        state = {k: local(v) for k, v in module.state_dict().items() if k in self.shadow}
        live = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():
            for key, value in state.items():
                value.copy_(local(self.shadow[key]))
        try:
            yield module
        finally:
            with torch.no_grad():
                for key, value in state.items():
                    value.copy_(live[key])


def split_batch(batch: dict[str, Any], max_batch_size: Optional[int]) -> list[tuple[dict[str, Any], float]]:
    """Chunks of at most `max_batch_size` rows, each with its fraction of the batch."""
    size = batch_rows(batch)
    if not max_batch_size or size <= max_batch_size:
        return [(batch, 1.0)]
    chunks = []
    for start in range(0, size, max_batch_size):
        chunk = {k: v[start : start + max_batch_size] if isinstance(v, (Tensor, list, tuple)) else v for k, v in batch.items()}
        chunks.append((chunk, min(max_batch_size, size - start) / size))
    return chunks


def batch_rows(batch: dict[str, Any]) -> int:
    """Rows of a batch; its fields must agree."""
    sizes = {len(v) for v in batch.values() if isinstance(v, (Tensor, list, tuple))}
    if len(sizes) != 1:
        raise ValueError(f"batch fields have different lengths: { {k: len(v) for k, v in batch.items() if v is not None} }")
    return sizes.pop()


class DiffusionTrainer:
    """Optimises the parts of `model`; subclasses say how a batch becomes a loss."""

    def __init__(self, model: nn.Module, parts: Sequence[nn.Module], config: Optional[TrainerConfig] = None,
                 device: Optional[torch.device | str] = None, planned_steps: Optional[int] = None,
                 parallel: Parallel = "ddp", **kwargs):
        """`planned_steps`: the optimizer steps each part will take (a training job's plan), which a decaying
        `lr_schedule` spans when `config.decay_steps` is unset. `parallel` (on several processes): `ddp` replicates
        each part, `fsdp` shards it over the ranks (dalle2/parallel.py)."""
        self.config = c = config if config is not None else TrainerConfig(**kwargs)
        self.device = torch.device(device) if device is not None else next(parts[0].parameters()).device
        if c.amp == "fp16" and self.device.type != "cuda":
            raise ValueError(f"trainer.amp='fp16' needs a CUDA device, the model is on {self.device}; use 'bf16'")
        self.parts = list(parts)
        self.model = self.place(model)
        if parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel={parallel!r}: 'ddp' or 'fsdp'")
        if c.gradient_checkpointing:
            for part in self.parts:
                set_gradient_checkpointing(part, True)
        # fsdp on several processes: each part's parameters sharded before its optimizer is built over them
        self.sharded = parallel == "fsdp" and world_size() > 1
        if self.sharded:
            for part in self.parts:
                shard(part)
        self._ema_in_use = False
        # fused: one kernel for every parameter's update (torch's CPU default is a Python loop per tensor)
        fused = self.device.type in ("cpu", "cuda")
        self.lrs, min_lrs = self.per_part(c.lr_of_parts), self.per_part(c.min_lr_of_parts)
        self.optimizers = [
            torch.optim.AdamW(p.parameters(), lr=lr, weight_decay=c.weight_decay, betas=c.betas, fused=fused)
            for p, lr in zip(self.parts, self.lrs)
        ]
        self.decay_steps = c.decay_steps or planned_steps
        if c.lr_schedule != "constant" and self.decay_steps is None:
            raise ValueError(f"trainer.lr_schedule={c.lr_schedule!r} needs trainer.decay_steps: the optimizer steps "
                             "the learning rate decays over")
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
                lr_multiplier, warmup_steps=c.warmup_steps, schedule=c.lr_schedule, decay_steps=self.decay_steps,
                floor=low / lr))
            for opt, lr, low in zip(self.optimizers, self.lrs, min_lrs)
        ]
        # ddp: one DistributedDataParallel per part on several processes (Ray Train's workers): its buckets
        # all-reduce gradients while the backward pass still runs; None on one process, or sharded
        self.replicas = [None if self.sharded else data_parallel(PartLoss(self, index), self.device)
                         for index in range(len(self.parts))]
        self.emas = [EMA(p, c.ema_beta, c.ema_update_after_step, c.ema_update_every) for p in self.parts]
        self.scalers = [torch.amp.GradScaler("cuda", enabled=c.amp == "fp16") for _ in self.parts]
        self.steps = [0 for _ in self.parts]
        self._pending = [0 for _ in self.parts]  # micro-batches accumulated since the last optimizer step
        self._pending_rows = [0 for _ in self.parts]  # their rows: gradients are averaged over rows, not batches

    def close(self) -> None:
        """Let go of the DistributedDataParallel wrappers now, before the process group is destroyed: one left to the
        garbage collector can outlive it, holding the group's threads, and abort the process as it exits."""
        import gc

        self.replicas = [None for _ in self.parts]
        gc.collect()

    def per_part(self, values_of: Callable[[Optional[int]], list[float]]) -> list[float]:
        """A per-part setting (lr, min_lr) for each part this trainer optimises."""
        return values_of(len(self.parts))

    def place(self, model: nn.Module) -> nn.Module:
        """Move what training needs to the device (subclasses may leave idle parts behind)."""
        return model.to(self.device)

    @property
    def step(self) -> int:
        """Optimizer steps taken, summed over parts."""
        return sum(self.steps)

    @property
    def accumulating(self) -> bool:
        """Whether a part holds gradients of micro-batches it has not stepped on yet (a checkpoint now would lose
        them: unets trained in turn with accumulation step one after the other)."""
        return any(self._pending)

    def compute_loss(self, batch: dict[str, Any], part: int) -> Tensor:
        raise NotImplementedError

    def train_step(self, batch: dict[str, Any], part: int = 0) -> float:
        """Backpropagate one batch (split into `max_batch_size` chunks); step every `grad_accum_every` calls."""
        c = self.config
        self.model.eval()  # frozen members (a CLIP, the unets of other stages) stay in eval mode
        self.parts[part].train()
        total = 0.0
        rows = batch_rows(batch)
        chunks = split_batch(batch, c.max_batch_size)
        if self.sharded:
            same_passes(len(chunks))
        steps_now = self._pending[part] + 1 >= c.grad_accum_every
        replica = self.replicas[part]
        for index, (chunk, fraction) in enumerate(chunks):
            # ranks exchange gradients once per optimizer step, in the backward pass of its last micro-batch
            syncs = steps_now and index == len(chunks) - 1
            if self.sharded:
                set_gradient_sync(self.parts[part], syncs)
            with (replica.no_sync() if replica is not None and not syncs else contextlib.nullcontext()):
                with autocast_context(self.device, c.amp):
                    loss = (replica(chunk) if replica is not None else self.compute_loss(chunk, part)) * fraction
                # summed over rows here, divided by all accumulated rows at the step: exact for unequal micro-batches
                self.scalers[part].scale(loss * rows).backward()
            total += loss.item()
        self._pending[part] += 1
        self._pending_rows[part] += rows
        if self._pending[part] >= c.grad_accum_every:
            self._optimizer_step(part)
        return total

    def _rows_per_rank(self, part: int) -> float:
        """Rows accumulated for this step, over all ranks, divided by the ranks: DDP averaged the ranks' row sums,
        so dividing by this gives the mean over every row any rank saw, as one worker would on all of them."""
        rows = self._pending_rows[part]
        if world_size() == 1:
            return float(rows)
        import torch.distributed as dist

        total = torch.tensor([float(rows)], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / dist.get_world_size()

    def _optimizer_step(self, part: int) -> None:
        optimizer, scaler = self.optimizers[part], self.scalers[part]
        scaler.unscale_(optimizer)
        # a parameter no rank used keeps no gradient (DDP leaves it alone), as on one worker: AdamW does not decay it
        grads = [p.grad for p in self.parts[part].parameters() if p.grad is not None]
        rows = self._rows_per_rank(part)
        if grads:
            torch._foreach_div_(grads, rows)
        if self.config.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.parts[part].parameters(), self.config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.schedulers[part].step()
        self.steps[part] += 1
        self._pending[part] = self._pending_rows[part] = 0
        self.emas[part].update(self.parts[part], self.steps[part])

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Any], part: int = 0) -> float:
        """The EMA weights' loss on a held-out batch (with its `seeds`, the same draws at every evaluation)."""
        with self.ema_weights(), autocast_context(self.device, self.config.amp):
            return self.compute_loss(batch, part).item()

    def evaluating(self) -> contextlib.AbstractContextManager:
        """Around an evaluation every rank runs at once: sharded parts hold their EMA weights gathered whole for all
        of it (its samplings and losses then need no communication, whatever rows each rank has)."""
        return self.ema_weights() if self.sharded else contextlib.nullcontext()

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """The model with every part's EMA weights loaded, for sampling and evaluation (nested: the outer one's).
        Sharded parts are gathered whole on every rank for its duration: every rank enters it together."""
        if self._ema_in_use:
            yield self.model
            return
        with contextlib.ExitStack() as stack:
            for ema, part in zip(self.emas, self.parts):
                stack.enter_context(ema.swapped_into(part))
            if self.sharded:
                stack.enter_context(gathered(self.parts))
            self._ema_in_use = True
            stack.callback(setattr, self, "_ema_in_use", False)
            modes = {m: m.training for m in self.model.modules()}
            self.model.eval()
            try:
                yield self.model
            finally:
                for module, training in modes.items():
                    module.training = training

    def model_config(self) -> dict:
        return self.model.config.model_dump(mode="json")

    def save(self, root: str, extra: Optional[dict[str, Any]] = None, storage_options: Optional[dict] = None) -> None:
        """Save weights, EMA weights and optimizer state to the folder `root` (any fsspec URL), whole tensors.
        On several processes rank 0 writes; every rank calls it (sharded parts are gathered from every rank)."""
        if rank() != 0 and not self.sharded:
            return  # nothing to gather
        prefixes = [_prefix_of(self.model, p) for p in self.parts]
        writes = rank() == 0
        weights = whole(trainable_entries(self.model.state_dict(), prefixes), writes)
        ema_state = {}
        for prefix, ema in zip(prefixes, self.emas):
            ema_state.update({prefix + k: whole(v, writes) for k, v in ema.shadow.items()})
        optimizers = [whole(o.state_dict(), writes) for o in self.optimizers]
        if not writes:
            return
        weights = as_saved(weights)
        ema_state = {**weights, **as_saved(ema_state)}  # the EMA covers floating-point entries; the rest are the model's own
        state = {
            "steps": self.steps,
            "optimizers": optimizers,
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scalers": [s.state_dict() for s in self.scalers],
            "trainer_config": self.config.model_dump(mode="json"),
            "decay_steps": self.decay_steps,  # the schedule's span (decay_steps, or the job's planned steps)
            "parts": prefixes,
            "extra": extra or {},
        }
        save_checkpoint(root, weights, self.model_config(), ema=ema_state, state=state, storage_options=storage_options)

    def load(self, root: str, storage_options: Optional[dict] = None) -> dict[str, Any]:
        """Resume from `root`; returns the `extra` dict given to `save` (e.g. the data position)."""
        state = load_checkpoint(root, self.model, self.model_config(), storage_options, prepare=self._as_own)
        parts = [_prefix_of(self.model, p) for p in self.parts]
        if state.get("parts", parts) != parts:
            raise ValueError(f"checkpoint {root} trained parts {state['parts']}, this trainer trains {parts}")
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(shard_optimizer_state(optimizer_state, optimizer))
        for items, key in ((self.schedulers, "schedulers"), (self.scalers, "scalers")):
            for item, item_state in zip(items, state[key]):
                item.load_state_dict(item_state)
        self._apply_config_to_optimizers(state.get("trainer_config", {}))
        if self.config.lr_schedule != "constant" and state.get("decay_steps", self.decay_steps) != self.decay_steps:
            log.info("the learning rate now decays over %s steps, not %s as before the resume (the job's plan "
                     "changed: epochs, max_steps or rows)", self.decay_steps, state["decay_steps"])
        self.steps = list(state["steps"])
        has_ema = exists(root.rstrip("/") + "/" + EMA_FILE, storage_options)
        ema_weights = load_weights(root, EMA_FILE, storage_options) if has_ema else None
        if not has_ema:
            log.warning("checkpoint %s has no EMA weights: the EMA restarts from its weights", root)
        for ema, part in zip(self.emas, self.parts):
            prefix = _prefix_of(self.model, part)
            live = part.state_dict()
            for key, shadow in ema.shadow.items():
                # never the freshly initialised weights the EMA was built from
                value = shard_like(ema_weights[prefix + key], shadow) if has_ema else live[key]
                local(shadow).copy_(local(value))
        return state.get("extra", {})

    def _as_own(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's whole weights as this trainer's model holds them (cut to this rank's shards)."""
        return shard_state(weights, self.model) if self.sharded else weights

    def init_weights(self, root: str, storage_options: Optional[dict] = None) -> None:
        """Start from the weights of the checkpoint `root` (its EMA ones where it has them): the optimizer, its step and
        the data position stay fresh (fine-tuning); the EMA starts at the loaded weights."""
        load_checkpoint(root, self.model, self.model_config(), storage_options, use_ema=True, prepare=self._as_own)
        for ema, part in zip(self.emas, self.parts):
            live = part.state_dict()
            for key, shadow in ema.shadow.items():
                local(shadow).copy_(local(live[key]))
        log.info("initialised from the weights of %s", root)

    def _apply_config_to_optimizers(self, saved: dict) -> None:
        """The config's lr, weight decay and betas win over those stored with the optimizer and scheduler
        (a resumed run with a new `trainer.lr` uses it, from the resumed step on the same warmup)."""
        c = self.config
        settings = ("lr", "weight_decay", "lr_schedule", "min_lr", "decay_steps")
        changed = {k: (saved[k], getattr(c, k)) for k in settings if k in saved and saved[k] != getattr(c, k)}
        for optimizer, scheduler, lr in zip(self.optimizers, self.schedulers, self.lrs):
            scheduler.base_lrs = [lr for _ in optimizer.param_groups]
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
            for group in optimizer.param_groups:
                group.update(initial_lr=lr, lr=lr * factor, weight_decay=c.weight_decay, betas=tuple(c.betas))
        if changed and saved:
            log.info("resumed with changed trainer settings (checkpoint, config): %s", changed)


def _prefix_of(model: nn.Module, part: nn.Module) -> str:
    """The state-dict prefix under which `part` sits inside `model`."""
    for name, module in model.named_modules():
        if module is part:
            return f"{name}." if name else ""
    raise ValueError("part is not a submodule of the model")


class PriorTrainer(DiffusionTrainer):
    """Trains a DiffusionPrior; batches are dicts of DiffusionPrior.forward's arguments."""

    def __init__(self, prior: nn.Module, config: Optional[TrainerConfig] = None, device=None, **kwargs):
        super().__init__(prior, [prior.net], config, device, **kwargs)

    def compute_loss(self, batch: dict[str, Any], part: int) -> Tensor:
        return self.model(**_to_device(batch, self.device))

    @torch.no_grad()
    def sample(self, **kwargs) -> Tensor:
        """Image embeds sampled with the EMA weights."""
        with self.ema_weights() as prior:
            return prior.sample(**_to_device(kwargs, self.device))


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


class DecoderTrainer(DiffusionTrainer):
    """Trains the unets of a Decoder, each with its own optimizer and EMA.

    `unet_numbers` picks the stages this trainer optimises (default: all); only those unets are moved
    to the device, so training one stage of a large cascade never holds the others there.
    """

    def __init__(self, decoder: nn.Module, config: Optional[TrainerConfig] = None, device=None,
                 unet_numbers: Optional[Sequence[int]] = None, **kwargs):
        self.unet_numbers = list(unet_numbers or range(1, len(decoder.unets) + 1))
        super().__init__(decoder, [decoder.unets[n - 1] for n in self.unet_numbers], config, device, **kwargs)

    def place(self, model: nn.Module) -> nn.Module:
        # Each unet's noise schedule goes with it: an untrained unet stays where it was, with its schedule.
        for name, child in model.named_children():
            if name not in ("unets", "diffusions"):
                child.to(self.device)
        for number in self.unet_numbers:
            model.unets[number - 1].to(self.device)
            model.diffusions[number - 1].to(self.device)
        return model

    def per_part(self, values_of: Callable[[Optional[int]], list[float]]) -> list[float]:
        # a list is one value per unet of the cascade, whichever of them this trainer trains
        values = values_of(len(self.model.unets))
        return [values[n - 1] for n in self.unet_numbers]

    def _part(self, unet_number: int) -> int:
        if unet_number not in self.unet_numbers:
            raise ValueError(f"this trainer trains unets {self.unet_numbers}, not unet {unet_number}")
        return self.unet_numbers.index(unet_number)

    def compute_loss(self, batch: dict[str, Any], part: int) -> Tensor:
        return self.model(**_to_device(batch, self.device), unet_number=self.unet_numbers[part])

    def train_step(self, batch: dict[str, Any], unet_number: int = 1) -> float:  # type: ignore[override]
        """One training batch for stage `unet_number`."""
        return super().train_step(batch, part=self._part(unet_number))

    def validation_loss(self, batch: dict[str, Any], unet_number: int = 1) -> float:  # type: ignore[override]
        """Stage `unet_number`'s EMA loss on a held-out batch."""
        return super().validation_loss(batch, part=self._part(unet_number))

    @torch.no_grad()
    def sample(self, start_image: Optional[Tensor] = None, start_at_unet_number: Optional[int] = None,
               stop_at_unet_number: Optional[int] = None, **kwargs) -> Tensor:
        """Images from the trained stages of the cascade with the EMA weights.

        A trainer of a later stage alone (e.g. unet 2) starts from `start_image`, the real images that
        stand in for the untrained stages before it: a stage this trainer does not train is never run.
        """
        first = start_at_unet_number or min(self.unet_numbers)
        last = stop_at_unet_number or max(self.unet_numbers)
        untrained = [n for n in range(first, last + 1) if n not in self.unet_numbers]
        if untrained:
            raise ValueError(f"sampling unets {first}-{last} would run unets {untrained}, which this trainer does not train")
        if first > 1 and start_image is None:
            raise ValueError(f"this trainer starts at unet {first}: pass start_image, the images unet {first} upsamples")
        with self.ema_weights() as decoder:
            return decoder.sample(**_to_device(kwargs, self.device), start_at_unet_number=first,
                                  stop_at_unet_number=last, start_image=start_image)
