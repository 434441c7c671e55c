"""A trained module and its optimizer behind one interface, whatever wraps them (nothing, DDP, a DeepSpeed engine).

The loop calls ``backward(loss)`` and ``step(lr)`` on each trained module (the auto-encoder; WAE-GAN's critic too),
inside ``accelerator.accumulate``: off an accumulation boundary the optimizer step is skipped and, under DDP, the
gradient all-reduce too. Under DeepSpeed each module has an engine of its own (accelerate's ``backward`` knows only
one engine), so the engine is driven directly. With ``train.low_precision_weights`` the loop calls a bf16 copy of
the module (:class:`LowPrecisionCopy`) and the optimizer, checkpoints and evaluation keep the float32 module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vegan_scale import checkpoint
from vegan_scale.distributed import deepspeed_support
from vegan_scale.distributed.compression import bf16_allreduce_hook
from vegan_scale.distributed.deepspeed_support import MOMENTS
from vegan_scale.errors import CheckpointError

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # computed in float32 under autocast


@dataclass
class LowPrecisionCopy:
    """A bf16 copy of a float32 module that the forward and backward passes use, refreshed once per optimizer step.

    Under autocast every weight is cast to bf16 at every step, and its gradient cast back; the copy is cast once,
    after the step, by copying the updated float32 masters into it. Normalisation layers are not copied: the copy
    shares them with the master (float32, as autocast runs them), so their parameters and running statistics are
    one. Everything that reads or writes weights (the optimizer, checkpoints, evaluation, export) sees the master.
    """

    master: nn.Module
    twin: nn.Module
    pairs: list[tuple[nn.Parameter, nn.Parameter]]  # (master, its bf16 copy), normalisation layers' left out

    @classmethod
    def of(cls, master: nn.Module) -> LowPrecisionCopy:
        shared = {id(m): m for m in master.modules() if isinstance(m, NORMS)}
        twin = copy.deepcopy(master, memo=dict(shared))  # the memo makes the copy reuse the norm layers
        copies = dict(twin.named_parameters())
        pairs = [(p, copies[name]) for name, p in master.named_parameters() if copies[name] is not p]
        for _, low in pairs:  # a convolution's weight channels-last: the product forms read it as a view
            layout = torch.channels_last if low.dim() == 4 else torch.preserve_format
            low.data = low.data.to(torch.bfloat16, memory_format=layout)
        return cls(master, twin, pairs)

    def gradients_to_masters(self) -> None:
        """Give each master its copy's gradient, in float32 and the master's layout (the copies' are cleared for
        the next step)."""
        for high, low in self.pairs:
            high.grad = None if low.grad is None else torch.empty_like(high).copy_(low.grad)
            low.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """The copy from the masters: after each optimizer step and whenever the masters are loaded."""
        for high, low in self.pairs:
            low.copy_(high)


@dataclass
class Trainable:
    name: str
    module: nn.Module  # what the loop calls: the module (or its bf16 copy), its DDP wrapper or DeepSpeed engine
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    low_precision: LowPrecisionCopy | None = None
    # The module as given to :func:`prepare` (the float32 master where a bf16 copy is what is wrapped). accelerate's
    # prepare wraps without replacing (DDP's and DeepSpeed's ``.module``; compiling is in place), so this is what its
    # unwrap_model would find, without that call's import of DeepSpeed in every run (1.2 s of a process's start).
    given: nn.Module | None = None  # None: ``module`` is not wrapped
    input_dtype: torch.dtype = field(init=False)  # the module's own precision, which inputs must match
    stepped: torch.optim.Optimizer = field(init=False)  # what step() steps

    def __post_init__(self) -> None:
        # Found once (float64 for exactness checks; DeepSpeed's half-precision modes keep the module in that
        # precision): the loop needs it at every micro-batch.
        self.input_dtype = next(self.raw.parameters()).dtype
        # accelerate's optimizer wrapper, without a gradient scaler (fp16) to drive, only calls the optimizer, after
        # two more metadata reads (0.2 ms a step) and, to zero the gradients, an inspection of the optimizer's
        # signature; the loop has already skipped steps off accumulation boundaries. DeepSpeed's engine steps its
        # own optimizer.
        inner = getattr(self.optimizer, "optimizer", None)
        plain = inner is not None and self.accelerator.scaler is None and self.engine is None
        self.stepped = inner if plain else self.optimizer

    @property
    def engine(self) -> object | None:
        return self.module if self.accelerator.distributed_type == DistributedType.DEEPSPEED else None

    @property
    def raw(self) -> nn.Module:
        """The unwrapped module, float32 master of a bf16 copy (its parameters are partitioned under ZeRO-3)."""
        return self.module if self.given is None else self.given

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
        if self.low_precision is not None:
            self.low_precision.gradients_to_masters()
        self.stepped.step()
        self.stepped.zero_grad(set_to_none=True)
        self._refresh()

    def _refresh(self) -> None:
        if self.low_precision is not None:
            self.low_precision.refresh()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the module's whole weights (gathered under ZeRO-3), on every process."""
        with deepspeed_support.gathered(self.raw):
            return {k: v.detach().clone() for k, v in self.raw.state_dict().items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Collective: set the module's whole weights (scattered back to the shards under ZeRO-3)."""
        with deepspeed_support.gathered(self.raw, modify=True):
            self.raw.load_state_dict(weights)
        self._refresh()

    def save(self, directory: Path) -> None:
        """Collective: write this module's whole weights and its optimizer's state by parameter name (gathered
        under ZeRO): one format in every mode, which any world size and mode continues."""
        if self.engine is not None:
            weights, optimizer_state = deepspeed_support.full_state(self.raw, self.engine)
        else:
            weights, optimizer_state = self.raw.state_dict(), optimizer_by_name(self.raw, self.optimizer)
        if self.accelerator.is_main_process:
            checkpoint.save_module(directory, self.name, weights, optimizer_state)

    def read(self, directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What this process needs to restore the module from ``directory``, read and checked against the module
        (every tensor it needs there, with its shape, and nothing else) but not applied. A CheckpointError names a
        file that does not load or does not fit."""
        weights = checkpoint.read_module(directory, self.name)
        optimizer_state = checkpoint.read_optimizer(directory, self.name)
        shapes = deepspeed_support.full_shapes(self.raw)
        _check_fits(checkpoint.module_file(directory, self.name), weights, shapes, shapes.keys())
        params = [name for name, _ in self.raw.named_parameters()]
        moments = {f"{n}/{key}": shapes[n] for n in params for key in MOMENTS} | {f"{n}/step": () for n in params}
        trained = {f"{n}/{key}" for n in params if f"{n}/step" in optimizer_state for key in (*MOMENTS, "step")}
        _check_fits(checkpoint.optimizer_file(directory, self.name), optimizer_state, moments, trained)
        return weights, optimizer_state

    def load(self, directory: Path, read: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        """Collective: restore weights and optimizer state, given what :meth:`read` returned."""
        weights, optimizer_state = read
        if self.engine is not None:
            deepspeed_support.load_full_state(self.raw, self.engine, weights, optimizer_state)
            return
        self.raw.load_state_dict(weights)
        load_optimizer_by_name(self.raw, self.optimizer, optimizer_state)
        self._refresh()

    def parameters_finite(self) -> torch.Tensor:
        """A device bool: whether every parameter (this process's shard under ZeRO-3) is finite; no sync."""
        tensors = [deepspeed_support.local_values(p, self.accelerator.process_index) for p in self.raw.parameters()]
        return torch.stack([t.isfinite().all() for t in tensors if t.numel()]).all()

    def frozen_parameters(self) -> dict[str, torch.Tensor]:
        """Current parameters as constants (whole, even under ZeRO-3), for calling a copy of the module."""
        return deepspeed_support.frozen_parameters(self.raw)


def _check_fits(file: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, Any], required: Any) -> None:
    """Refuse a checkpoint file that lacks a ``required`` entry, holds one ``shapes`` does not know, or one of
    another shape: it belongs to another model."""
    unknown = sorted(set(tensors) - set(shapes))
    missing = sorted(set(required) - set(tensors))
    wrong = sorted(k for k in set(tensors) & set(shapes) if tuple(tensors[k].shape) != tuple(shapes[k]))
    if unknown or missing or wrong:
        found = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("unknown", unknown), ("missing", missing), ("of another shape", wrong))
            if keys
        )
        raise CheckpointError(f"{file} does not fit the model being trained ({found}): it belongs to another model")


def optimizer_by_name(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An Adam(W)'s state keyed by parameter name (``<param>/exp_avg``, ``/exp_avg_sq``, ``/step``) rather than
    by position: the same whatever wraps or shards the module."""
    names = {id(p): name for name, p in module.named_parameters()}
    return {
        f"{names[id(p)]}/{key}": optimizer.state[p][key].detach()
        for group in optimizer.param_groups
        for p in group["params"]
        if p in optimizer.state
        for key in (*MOMENTS, "step")
    }


def load_optimizer_by_name(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """Set an Adam(W)'s state from :func:`optimizer_by_name`'s form (through ``load_state_dict``, which puts each
    tensor on its parameter's device and dtype)."""
    names = {id(p): name for name, p in module.named_parameters()}
    saved = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved["state"] = {
        index: {key: state[f"{names[id(p)]}/{key}"] for key in (*MOMENTS, "step")}
        for index, p in enumerate(params)
        if f"{names[id(p)]}/step" in state
    }
    optimizer.load_state_dict(saved)


def prepare(
    accelerator: Accelerator,
    name: str,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_compression: str = "none",
    low_precision_weights: bool = False,
) -> Trainable:
    """Wrap ``module`` and ``optimizer`` for the running distribution mode; under DeepSpeed with the plugin ``name``;
    under DDP with ``grad_compression=bf16``, its gradients all-reduced in bf16. ``low_precision_weights``: what is
    wrapped and called is a bf16 copy of ``module`` (one process or DDP; ``optimizer`` holds ``module``'s
    parameters, the masters)."""
    select_plugin(accelerator, name)
    low_precision = LowPrecisionCopy.of(module) if low_precision_weights else None
    wrapped, optimizer = accelerator.prepare(module if low_precision is None else low_precision.twin, optimizer)
    if grad_compression == "bf16" and isinstance(wrapped, DistributedDataParallel):
        wrapped.register_comm_hook(None, bf16_allreduce_hook)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        deepspeed_support.match_buffers_to_parameters(module)
    return Trainable(name, wrapped, optimizer, accelerator, low_precision, given=module)


def select_plugin(accelerator: Accelerator, name: str) -> None:
    """Under DeepSpeed with one engine per module, make ``name``'s plugin the current one."""
    plugins = accelerator.state.deepspeed_plugins if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if isinstance(plugins, dict) and len(plugins) > 1:
        accelerator.state.select_deepspeed_plugin(name)
