"""Per-step scalars summed on the device, read once per flush: metrics that never make a step wait."""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a collective over processes, e.g. the mean


class MetricBuffer:
    """Sums of per-step scalars kept on the device (in float64, so that a float64 run's logs keep its precision);
    :meth:`flush` returns their means as floats (one sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            v = value.detach().double()
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
        self.count += 1

    def flush(self, mean_over_processes: Reduce | None = None) -> tuple[dict[str, float], int]:
        """(means since the last flush, number of steps they cover); with ``mean_over_processes`` (collective), the
        means over every process too: the global batch's values, as one process would have computed them."""
        count = self.count
        if not self.sums:
            return {}, 0
        keys = list(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]) / count
        means = (stacked if mean_over_processes is None else mean_over_processes(stacked)).tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, means, strict=True)), count
