"""The one place that builds the Accelerator, and the batch layout it implies.

Launch topology comes from the launcher (``accelerate launch``, torchrun, SLURM), never from the experiment: the
config states the global batch, and each of the ``world_size`` processes takes an equal share, in one micro-batch
or, when ``train.micro_batch_size`` caps it, in several accumulated micro-batches.

Traps handled here (stack-on-cpu notes): without CUDA, accelerate must be told ``cpu=True`` or each process of a
multi-process launch believes it is alone; under DeepSpeed that same flag silently turns the run into plain DDP,
so DeepSpeed runs name the gloo backend instead.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext as _nothing
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
)

from vegan_scale.checkpoint import AUTOENCODER
from vegan_scale.distributed import deepspeed_support
from vegan_scale.errors import ConfigError, LostRankError, VeganError
from vegan_scale.stops import ending_at_once

log = logging.getLogger(__name__)


def deepspeed_requested() -> bool:
    """Whether the launcher asked for DeepSpeed (``accelerate launch --use_deepspeed`` or a DEEPSPEED config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(
    mixed_precision: str,
    models: tuple[str, ...] = (AUTOENCODER,),
    timeout_s: float = 600.0,
    grad_compression: str = "none",
    bucket_mb: int = 25,
    low_precision_weights: bool = False,
) -> Accelerator:
    """An Accelerator for whatever the launcher started: one process, DDP on CPU or GPU, or DeepSpeed.

    ``models`` names the separately trained modules; under DeepSpeed each gets an engine of its own.
    ``timeout_s`` bounds how long a collective waits for a process that has died. Under DDP, ``bucket_mb`` sizes
    the gradient buckets; ``grad_compression`` and ``low_precision_weights`` are only checked here (DeepSpeed
    refuses them) and applied by :func:`vegan_scale.distributed.trainable.prepare`.
    """
    # accelerate keeps its settings in process-wide singletons that refuse to change; a process that trains more
    # than once (the Python API, the tests) starts each run afresh, keeping only the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cuda = torch.cuda.is_available()
    timeout = timedelta(seconds=timeout_s)
    if deepspeed_requested():
        if grad_compression != "none":
            raise ConfigError(
                f"train.grad_compression={grad_compression} is for DDP; DeepSpeed reduces gradients itself (its "
                "JSON's communication_data_type): set train.grad_compression=none"
            )
        if low_precision_weights:
            raise ConfigError(
                "train.low_precision_weights=true is for one process or DDP; DeepSpeed's bf16 mode keeps bf16 weights "
                "with float32 masters itself: set train.low_precision_weights=false"
            )
        group = InitProcessGroupKwargs(timeout=timeout, **({} if cuda else {"backend": "gloo"}))
        options = {"deepspeed_plugin": deepspeed_support.plugins(models), "kwargs_handlers": [group]}
    else:
        group = InitProcessGroupKwargs(timeout=timeout)
        options = {"cpu": not cuda, "kwargs_handlers": [group, DistributedDataParallelKwargs(bucket_cap_mb=bucket_mb)]}
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # then the processes meet here: torch's rendezvous
    if several:
        _check_port(os.environ.get("MASTER_PORT"))
    try:
        with ending_at_once(f"the other processes of the job at {_meeting_point()}") if several else _nothing():
            accelerator = Accelerator(mixed_precision=mixed_precision, **options)
    except torch.distributed.DistError as e:
        raise _rendezvous_error(e, timeout_s) from e
    if mixed_precision == "bf16" and accelerator.local_process_index == 0:  # once a node
        _warn_if_bf16_emulated(cuda)
    return accelerator


def _rendezvous_error(error: Exception, timeout_s: float) -> VeganError:
    """The error a failed rendezvous stands for: the port taken by another program (a usage error), or processes
    that did not all arrive within the timeout (some did not start, or cannot reach the address)."""
    env = os.environ.get
    who, where = f"process {env('RANK', '?')} of {env('WORLD_SIZE', '?')}", _meeting_point()
    if "EADDRINUSE" in str(error):
        return ConfigError(
            f"{who} cannot host the job's rendezvous at {where}: the port is in use by another program (another "
            "job on this node?); choose a free port (MASTER_PORT, or accelerate launch --main_process_port)"
        )
    return LostRankError(
        f"{who}: the job's processes did not all meet at {where} within {timeout_s:g} s "
        f"(train.collective_timeout_s; torch: {str(error).strip()}). Some processes did not start, or cannot reach "
        f"{where}: check that every node's launcher was given the same address and port (MASTER_ADDR and "
        "MASTER_PORT, or accelerate launch --main_process_ip and --main_process_port), that the address is the "
        "first node's, and that the port is open between the nodes"
    )


def _check_port(port: str | None) -> None:
    """A rendezvous port out of range, as a launcher script's arithmetic or a typo can make it, said as such:
    torch's store fails on it with a traceback that does not name the variable."""
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(
            f"MASTER_PORT={port!r} is not a port number (1 to 65535): set MASTER_PORT, or accelerate launch "
            "--main_process_port, to a free port"
        )


def _meeting_point() -> str:
    """Where the processes of the job meet: MASTER_ADDR:MASTER_PORT, as the launcher set them."""
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _warn_if_bf16_emulated(cuda: bool) -> None:
    if not bf16_emulated(cuda):
        return
    device = "GPU has no bf16 arithmetic (compute capability below 8.0)" if cuda else "CPU has no bf16 instructions"
    log.warning(
        "train.mixed_precision=bf16: this %s, so bf16 is emulated and runs slower than float32 (2-3x on a CPU "
        "without AVX-512 BF16 or AMX, docs/performance.md); set train.mixed_precision=no for speed",
        device,
    )


def bf16_emulated(cuda: bool) -> bool:
    """Whether bf16 products run without native instructions here, so that bf16 is slower than float32, not faster:
    a CUDA GPU older than Ampere, or an x86 CPU without AVX-512 BF16 and AMX. Other CPUs are not known: False."""
    if cuda:
        return not torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("architecture") != "x86_64":
        return False
    return not (capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def distribution_mode(accelerator: Accelerator) -> str:
    """How the run is distributed, as checkpoints record it: single, ddp, or zero-<stage>."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"zero-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def processes_per_node(accelerator: Accelerator) -> int:
    """The processes on each node: $LOCAL_WORLD_SIZE, which the launchers set (torchrun, accelerate launch, the
    SLURM scripts); without it, all of them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def node_of(accelerator: Accelerator) -> tuple[int, int]:
    """(this process's node, the number of nodes). Launchers number ranks node by node."""
    per_node = processes_per_node(accelerator)
    return accelerator.process_index // per_node, max(1, accelerator.num_processes // per_node)


def launch_tags(accelerator: Accelerator) -> dict[str, str]:
    """How the run was launched, as tracking tags (what a person filters runs by)."""
    tags = {
        "dist.type": str(accelerator.distributed_type.value),
        "dist.world_size": str(accelerator.num_processes),
        "dist.nodes": str(node_of(accelerator)[1]),
    }
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        tags["dist.zero_stage"] = str(accelerator.state.deepspeed_plugin.zero_stage)
    return tags


_ENDED: list[torch.distributed.ProcessGroup] = []  # the last process group ended: kept, never destroyed (see shutdown)


def shutdown() -> None:
    """End the process group, once training is over (not inside ``train``, so Python callers may train again).

    The group is ended but its object kept: destroying a gloo group joins its worker threads with the interpreter's
    lock held, and a worker still releasing the tensors of the last collective needs that lock. A refusal raised
    right after an agreement (a run directory the processes do not share) let the model's reducer drop the group's
    last reference as the error left the program, and on a busy node the process hung there, its error printed.
    The object goes when the process ends (without Python's teardown, :mod:`vegan_scale.process_exit`) or when a
    later training of the same process ends its own group, long after this one's last collective."""
    if torch.distributed.is_initialized():
        _ENDED[:] = [torch.distributed.group.WORLD]
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch is shared: each process runs ``accumulation`` micro-batches of ``micro`` samples."""

    global_batch: int
    world_size: int
    micro: int

    @property
    def per_process(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accumulation(self) -> int:
        return self.per_process // self.micro

    @classmethod
    def derive(cls, global_batch: int, world_size: int, micro_cap: int | None) -> BatchLayout:
        if global_batch % world_size:
            raise ConfigError(
                f"train.global_batch_size={global_batch} cannot be split evenly over {world_size} processes; "
                f"use a multiple of {world_size} (e.g. {world_size * max(1, round(global_batch / world_size))})"
            )
        per_process = global_batch // world_size
        micro = per_process if micro_cap is None or micro_cap >= per_process else micro_cap
        if per_process % micro:
            divisors = [d for d in range(1, micro + 1) if per_process % d == 0]
            raise ConfigError(
                f"train.micro_batch_size={micro_cap} does not divide the {per_process} samples each of {world_size} "
                f"process(es) takes of train.global_batch_size={global_batch}; use a divisor such as {divisors[-1]}"
            )
        return cls(global_batch, world_size, micro)


def apply_layout(accelerator: Accelerator, layout: BatchLayout, mixed_precision: str) -> None:
    """Give the Accelerator (and every DeepSpeed plugin) the accumulation and batch sizes the layout derived."""
    accelerator.gradient_accumulation_steps = layout.accumulation
    plugins = accelerator.state.deepspeed_plugins
    for plugin in plugins.values() if isinstance(plugins, dict) else [plugins] if plugins else []:
        deepspeed_support.configure(plugin, layout.micro, layout.accumulation, layout.world_size, mixed_precision)
