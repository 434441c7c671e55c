"""The one place that builds the Accelerator, derives the per-process batch, and makes the ranks agree.

Launch topology comes from the launcher (``accelerate launch``, torchrun, SLURM), never from the experiment:
the config states the global batch and each process takes ``global / world_size`` of it.

Agreement: decisions that every rank must take together (stop on a non-finite loss, stop on request) are flags
held on the device and combined with one all-reduce (max) every ``train.check_every`` steps. Between checks a
rank only sets flags, so a check costs one tiny collective and one device sync, measured as ``perf/agree_ms``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import IntEnum

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from vegan_scale.errors import ConfigError


def build_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator for whatever the launcher started: one process, DDP on CPU or GPU, or DeepSpeed.

    Without CUDA, accelerate must be told ``cpu=True`` or every process believes it is alone (stack-on-cpu
    notes); DeepSpeed is the exception (``cpu=True`` silently turns it into DDP) and needs gloo named instead.
    """
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if torch.cuda.is_available():
        return Accelerator(mixed_precision=mixed_precision)
    if deepspeed:
        return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(mixed_precision=mixed_precision, cpu=True)


def shutdown() -> None:
    """End the process group, once training is over (not inside ``train``, so Python callers may train again)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch is shared: every process takes ``per_process`` samples per step."""

    global_batch: int
    world_size: int

    @property
    def per_process(self) -> int:
        return self.global_batch // self.world_size

    @classmethod
    def derive(cls, global_batch: int, world_size: int) -> BatchLayout:
        if global_batch % world_size:
            raise ConfigError(
                f"train.global_batch_size={global_batch} cannot be split evenly over {world_size} processes; "
                f"use a multiple of {world_size} (e.g. {world_size * max(1, round(global_batch / world_size))})"
            )
        return cls(global_batch, world_size)


class Flag(IntEnum):
    NONFINITE = 0  # a loss became NaN or infinite
    DATA_ERROR = 1  # a rank's loader failed (data.on_error=raise)


class Agreement:
    """Flags raised by any rank and seen by all ranks at the next check (one all-reduce of a few numbers)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.flags = torch.zeros(len(Flag), device=accelerator.device)
        self.last_check_ms = 0.0

    def raise_if(self, flag: Flag, condition: torch.Tensor) -> None:
        """Set ``flag`` when ``condition`` (a device bool tensor) holds, without a device sync."""
        self.flags[flag] = torch.maximum(self.flags[flag], condition.to(self.flags.dtype))

    def check(self) -> set[Flag]:
        """The flags any rank has raised since the start; collective: every rank must call it at the same step."""
        start = time.perf_counter()
        flags = self.flags.clone()
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        raised = {f for f in Flag if flags[f].item() > 0}
        self.last_check_ms = (time.perf_counter() - start) * 1e3
        return raised
