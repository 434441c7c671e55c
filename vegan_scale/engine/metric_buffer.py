"""Per-step scalars summed on the device, read once per flush: metrics that never make a step wait."""

from __future__ import annotations

import torch


class MetricBuffer:
    """Sums of per-step scalars kept on the device; :meth:`flush` returns their means as floats (one sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            v = value.detach().float()
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
        self.count += 1

    def flush(self) -> tuple[dict[str, float], int]:
        """(means since the last flush, number of steps they cover)."""
        count = self.count
        if not self.sums:
            return {}, 0
        keys = list(self.sums)
        means = (torch.stack([self.sums[k] for k in keys]) / count).tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, means, strict=True)), count
