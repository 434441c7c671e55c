"""Agreement between ranks: decisions every rank must take together, at the same step.

Flags (a non-finite loss, a loader failure) are held in a small device tensor. A rank raises a flag with a
device-side max (no sync); every ``train.check_every`` steps all ranks all-reduce the flags (max) at the same step
and act on the result together. One collective of a few numbers and one device sync per check, its wall time
reported as ``perf/agree_ms``.
"""

from __future__ import annotations

import time
from enum import IntEnum

import torch


class Flag(IntEnum):
    NONFINITE = 0  # a loss became NaN or infinite
    DATA_ERROR = 1  # a rank's loader failed (data.on_error=raise)


class Agreement:
    """Flags raised by any rank and seen by all ranks at the next check."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.world_size = world_size
        self.flags = torch.zeros(len(Flag), device=device)
        self.last_check_ms = 0.0

    def raise_if(self, flag: Flag, condition: torch.Tensor) -> None:
        """Set ``flag`` when ``condition`` (a device bool tensor) holds, without a device sync."""
        self.flags[flag] = torch.maximum(self.flags[flag], condition.to(self.flags.dtype))

    def check(self) -> set[Flag]:
        """The flags any rank has raised since the start; collective: every rank must call it at the same step."""
        start = time.perf_counter()
        flags = self.flags.clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        raised = {f for f in Flag if flags[f].item() > 0}
        self.last_check_ms = (time.perf_counter() - start) * 1e3
        return raised
