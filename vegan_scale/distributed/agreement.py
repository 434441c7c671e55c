"""Agreement between ranks: decisions every rank must take together, at the same step.

Each flag (a loss term went non-finite, a loader failed, a stop was requested) holds the first step at which a
rank raised it, in a small device tensor (infinity when not raised). A rank raises a flag with device-side ops
only, so no step waits for it; every ``train.check_every`` steps, and before every checkpoint, all ranks
all-reduce the tensor (minimum) at the same step and act on the result together. One collective of a few numbers
and one device sync per check, its wall time reported as ``perf/agree_ms``.
"""

from __future__ import annotations

import math
import time
from enum import IntEnum

import torch


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
