"""The trained modules of a run: the auto-encoder and, for a penalty that brings one, its critic.

Each is built identically on every process (same seed), given an AdamW of its own (the critic at the learning rate
its penalty asks for) and wrapped for the running distribution mode. The penalty is then pointed at the trained
critic's parameters.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from vegan_scale.checkpoint import AUTOENCODER, CRITIC
from vegan_scale.distributed import deepspeed_support, trainable
from vegan_scale.distributed.accelerator import processes_per_node
from vegan_scale.distributed.trainable import Trainable
from vegan_scale.engine.pretrain import pretrain
from vegan_scale.errors import ConfigError
from vegan_scale.experiment import PENALTIES
from vegan_scale.models.autoencoder import init_layer
from vegan_scale.penalties.base import LatentPenalty
from vegan_scale.registry import build_model, build_penalty


@dataclass(frozen=True)
class Modules:
    autoencoder: Trainable
    critic: Trainable | None  # the latent critic of adversarial penalties

    def __iter__(self) -> Iterator[Trainable]:
        return iter([self.autoencoder] if self.critic is None else [self.autoencoder, self.critic])

    @property
    def wrapped(self) -> list[nn.Module]:
        """What ``accelerator.accumulate`` takes: the modules as the mode wraps them."""
        return [m.module for m in self]


DTYPES = {"float32": torch.float32, "float64": torch.float64}  # train.dtype


def module_names(cfg: Any) -> tuple[str, ...]:
    """The separately trained modules of an experiment (each gets an optimizer, and under DeepSpeed an engine, of its
    own), known before they are built."""
    return (AUTOENCODER, CRITIC) if PENALTIES[cfg.penalty.kind].trains_critic else (AUTOENCODER,)


def build_modules(
    cfg: Any, accelerator: Accelerator, new: bool, stopping: Callable[[], bool] = lambda: False
) -> tuple[Modules, LatentPenalty]:
    """The auto-encoder and the penalty (with its critic, if any), built identically on every process and wrapped.
    ``new``: a run that starts from its initial parameters, whose encoder is pre-trained when the config asks
    (``stopping``: whether a stop was asked for, which ends a stalled read of its images)."""
    if cfg.train.dtype == "float64" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "train.dtype=float64 under DeepSpeed: its ZeRO optimizers keep float32 masters, so the run would not be "
            "float64; use one process or DDP for float64, or train.dtype=float32"
        )
    _check_memory(cfg, accelerator)
    torch.manual_seed(cfg.run.seed)  # identical initial parameters on every process
    with _init_context(accelerator):  # under ZeRO-3 the auto-encoder is never whole on one process
        model = build_model(cfg).to(DTYPES[cfg.train.dtype])
    if cfg.model.init_std is not None and _zero3(accelerator):
        deepspeed_support.initialise(model, functools.partial(init_layer, std=cfg.model.init_std))
    if new:
        pretrain(cfg, model, stopping)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()
    penalty = build_penalty(cfg)
    if penalty.critic is not None:
        penalty.critic.to(DTYPES[cfg.train.dtype])
    wrap = functools.partial(
        trainable.prepare,
        accelerator,
        grad_compression=cfg.train.grad_compression,
        low_precision_weights=cfg.train.low_precision_weights,
    )
    autoencoder = wrap(AUTOENCODER, model, adamw(model.parameters(), cfg.optim.lr, cfg.optim))
    critic = None
    if penalty.critic is not None:
        critic = wrap(CRITIC, penalty.critic, adamw(penalty.critic.parameters(), penalty.critic_lr, cfg.optim))
        penalty.use_critic(critic.frozen_parameters)
    return Modules(autoencoder, critic), penalty


def _check_memory(cfg: Any, accelerator: Accelerator) -> None:
    """Refuse networks (the auto-encoder, and the penalty's critic if it has one) whose parameters alone outgrow
    this machine's memory (every process of the node builds them whole, or its share under ZeRO-3), naming their
    settings: torch's own error names only the bytes it could not allocate. Counted on the meta device, where
    building allocates nothing."""
    with torch.device("meta"):
        critic = build_penalty(cfg).critic
        count = sum(p.numel() for p in build_model(cfg).parameters())
        count += sum(p.numel() for p in critic.parameters()) if critic is not None else 0
    per_node = processes_per_node(accelerator)
    share = count / accelerator.num_processes if _zero3(accelerator) else count
    need = share * per_node * DTYPES[cfg.train.dtype].itemsize
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        network, with_critic = cfg.model.network, critic is not None
        raise ConfigError(
            f"model.network={network} with these settings has {count:,} parameters"
            f"{' with the critic' if with_critic else ''}: {need / 2**30:,.1f} GiB on this machine ({per_node} "
            f"process(es)), more than its {memory / 2**30:,.0f} GiB of memory; reduce model.{network} or "
            f"model.latent_dim{f', or penalty.{cfg.penalty.kind}' if with_critic else ''}"
        )


def adamw(params: Any, lr: float, optim: Any) -> torch.optim.Optimizer:
    """The WAE recipes' Adam (decoupled weight decay, 0 by default) with the ``optim`` section's settings."""
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, fused=optim.fused
    )


def _zero3(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED and (
        accelerator.state.deepspeed_plugin.zero_stage == 3
    )


def _init_context(accelerator: Accelerator) -> contextlib.AbstractContextManager:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return contextlib.nullcontext()
    trainable.select_plugin(accelerator, AUTOENCODER)
    return deepspeed_support.init_context(accelerator.state.deepspeed_plugin)
