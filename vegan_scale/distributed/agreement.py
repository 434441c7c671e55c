"""Agreement between ranks: decisions every rank must take together, at the same step.

Each flag (a loss term went non-finite, a loader failed, a stop was requested) holds the first step at which a
rank raised it, in a small device tensor (infinity when not raised). A rank raises a flag with device-side ops
only, so no step waits for it; every ``train.check_every`` steps, and before every checkpoint, all ranks
all-reduce the tensor (minimum) at the same step and act on the result together. One collective of a few numbers
and one device sync per check, its wall time reported as ``perf/agree_ms``.

Before any of that, at start, every rank must hold the same experiment (:func:`require_same`).
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import time
from enum import IntEnum

import torch

from vegan_scale.errors import ConfigError


class Flag(IntEnum):
    NONFINITE_RECON = 0  # the reconstruction cost became NaN or infinite
    NONFINITE_PENALTY = 1  # the latent penalty did
    NONFINITE_CRITIC = 2  # the critic's loss did (adversarial penalties)
    NONFINITE_PARAMS = 6  # a parameter did (checked before every checkpoint, so that none holds one)
    DATA_ERROR = 3  # a rank's loader failed (data.on_error=raise)
    DATA_STALL = 7  # a rank's data stopped coming: no batch for data.stall_timeout_s, or a loader worker ended
    PREEMPT = 4  # a stop was requested (flag file, SIGUSR1, SIGTERM): checkpoint, exit 75
    INTERRUPT = 5  # Ctrl-C: checkpoint, exit 130


NONFINITE = (Flag.NONFINITE_RECON, Flag.NONFINITE_PENALTY, Flag.NONFINITE_CRITIC, Flag.NONFINITE_PARAMS)


class Agreement:
    """Flags raised by any rank, with the step they were first raised at, seen by all ranks at the next check."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.world_size = world_size
        self.first = torch.full((len(Flag),), math.inf, dtype=torch.float64, device=device)
        self.last_check_ms = 0.0

    def raise_if(self, flag: Flag, condition: torch.Tensor, step: int) -> None:
        """Record ``step`` for ``flag`` where ``condition`` (a device bool tensor) holds; no device sync."""
        self.first[flag] = torch.where(condition, torch.clamp(self.first[flag], max=step), self.first[flag])

    def check(self) -> dict[Flag, int]:
        """{flag: first step any rank raised it}; collective: every rank must call it at the same step."""
        start = time.perf_counter()
        first = self.first.clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        values = first.tolist()
        self.last_check_ms = (time.perf_counter() - start) * 1e3
        return {f: int(values[f]) for f in Flag if values[f] != math.inf}


def require_same(facts: dict[str, str], world_size: int) -> None:
    """Collective, at start: every process of the job must hold the same ``facts`` (its resolved configuration, its
    view of the data, its installation). Processes that differ would train apart without a word: DDP averages
    gradients but not learning rates, and processes that see different shard lists draw overlapping or missing
    samples. A difference is a ConfigError on every process, naming the keys that differ and who holds what.
    One small collective (a digest each); the facts themselves travel only when the digests differ."""
    if world_size == 1:
        return
    digests: list[str | None] = [None] * world_size
    torch.distributed.all_gather_object(digests, hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest())
    if len(set(digests)) == 1:
        return
    everyone: list[tuple[str, dict[str, str]] | None] = [None] * world_size
    torch.distributed.all_gather_object(everyone, (socket.gethostname(), facts))
    raise ConfigError(
        f"the processes of the job do not run the same experiment: {_differences(everyone)}. Every process must read "
        "the same experiment file with the same overrides, the same shards and the same installation: one command "
        "line for every node, and the files on a file system every node shares"
    )


def _differences(everyone: list, keys_shown: int = 3, processes_shown: int = 4) -> str:
    """The first keys whose values differ, each value with the processes (and hosts) that hold it."""
    keys = sorted({key for _, facts in everyone for key in facts})
    differing = [key for key in keys if len({facts.get(key) for _, facts in everyone}) > 1]
    described = []
    for key in differing[:keys_shown]:
        holders: dict[str | None, list[str]] = {}
        for rank, (host, facts) in enumerate(everyone):
            holders.setdefault(facts.get(key), []).append(f"{rank} ({host})")
        values = [
            f"{value} on process {', '.join(who[:processes_shown])}"
            + (f" and {len(who) - processes_shown} more" if len(who) > processes_shown else "")
            for value, who in holders.items()
        ]
        described.append(f"{key} is {' but '.join(values)}")
    more = f" (and {len(differing) - keys_shown} more key(s))" if len(differing) > keys_shown else ""
    return "; ".join(described) + more
