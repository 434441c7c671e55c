"""A trained module and its optimizer behind one interface, whatever wraps them (nothing, DDP, a DeepSpeed engine).

The loop calls ``backward(loss)`` and ``step(lr)`` on each trained module (the auto-encoder; WAE-GAN's critic too),
inside ``accelerator.accumulate``: off an accumulation boundary the optimizer step is skipped and, under DDP, the
gradient all-reduce too. Under DeepSpeed each module has an engine of its own (accelerate's ``backward`` knows only
one engine), so the engine is driven directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from vegan_scale import checkpoint
from vegan_scale.distributed import deepspeed_support


@dataclass
class Trainable:
    name: str
    module: nn.Module  # what the loop calls: the module, its DDP wrapper or its DeepSpeed engine
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator

    @property
    def engine(self) -> object | None:
        return self.module if self.accelerator.distributed_type == DistributedType.DEEPSPEED else None

    @property
    def raw(self) -> nn.Module:
        """The unwrapped module (its parameters are partitioned under ZeRO-3)."""
        return self.accelerator.unwrap_model(self.module)

    @property
    def input_dtype(self) -> torch.dtype:
        """DeepSpeed's half-precision modes keep the module in that precision: inputs must match it."""
        return next(self.raw.parameters()).dtype if self.engine is not None else torch.float32

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is None:
            self.accelerator.backward(loss)
            return
        self.engine.set_gradient_accumulation_boundary(self.accelerator.sync_gradients)
        self.engine.backward(loss)

    def step(self, lr: float) -> None:
        """An optimizer step at ``lr`` when this micro-batch ends an accumulation; otherwise nothing."""
        if not self.accelerator.sync_gradients:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.engine is not None:
            self.engine.step()
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the module's whole weights (gathered under ZeRO-3), on every process."""
        with deepspeed_support.gathered(self.raw):
            return {k: v.detach().clone() for k, v in self.raw.state_dict().items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Collective: set the module's whole weights (scattered back to the shards under ZeRO-3)."""
        with deepspeed_support.gathered(self.raw, modify=True):
            self.raw.load_state_dict(weights)

    def save(self, directory: Path) -> None:
        """Collective: write this module's checkpoint files: its whole weights as safetensors (for export) and,
        for continuing, its optimizer state, or under DeepSpeed the engine's own sharded files."""
        weights = self.full_state_dict() if self.engine is not None else self.raw.state_dict()
        if self.engine is not None:
            deepspeed_support.save_engine(self.engine, directory / self.name)
            if self.accelerator.is_main_process:
                checkpoint.save_module(directory, self.name, weights, None)
        elif self.accelerator.is_main_process:
            checkpoint.save_module(directory, self.name, weights, self.optimizer.state_dict())

    def read(self, directory: Path) -> Any:
        """What this process needs to restore the module from ``directory``, read and checked but not applied: the
        weights and optimizer state, or under DeepSpeed nothing (this process's engine files are read once, to be
        sure they load). A CheckpointError names a file that does not load."""
        if self.engine is not None:
            deepspeed_support.check_engine_files(directory / self.name, self.accelerator.process_index)
            return None
        return checkpoint.read_module(directory, self.name), checkpoint.read_optimizer(directory, self.name)

    def load(self, directory: Path, read: Any) -> None:
        """Collective: restore weights and optimizer state from ``directory``, given what :meth:`read` returned."""
        if self.engine is not None:
            deepspeed_support.load_engine(self.engine, directory / self.name)
            return
        weights, optimizer_state = read
        self.raw.load_state_dict(weights)
        self.optimizer.load_state_dict(optimizer_state)

    def parameters_finite(self) -> torch.Tensor:
        """A device bool: whether every parameter (this process's shard under ZeRO-3) is finite; no sync."""
        tensors = [deepspeed_support.local_values(p, self.accelerator.process_index) for p in self.raw.parameters()]
        return torch.stack([t.isfinite().all() for t in tensors if t.numel()]).all()

    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        """Current parameters as constants (whole, even under ZeRO-3), for calling a copy of the module."""
        return deepspeed_support.frozen_parameters(self.raw)


def prepare(accelerator: Accelerator, name: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> Trainable:
    """Wrap ``module`` and ``optimizer`` for the running distribution mode; under DeepSpeed with the plugin ``name``."""
    select_plugin(accelerator, name)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        deepspeed_support.match_buffers_to_parameters(accelerator.unwrap_model(wrapped))
    return Trainable(name, wrapped, optimizer, accelerator)


def select_plugin(accelerator: Accelerator, name: str) -> None:
    """Under DeepSpeed with one engine per module, make ``name``'s plugin the current one."""
    plugins = accelerator.state.deepspeed_plugins if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if isinstance(plugins, dict) and len(plugins) > 1:
        accelerator.state.select_deepspeed_plugin(name)
