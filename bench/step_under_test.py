"""vegan_scale's training step on in-memory images, for the benchmarks: the engine's own step function and setup,
with the data feed replaced by batches cut from a tensor (the loader is measured on its own, in loader.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from vegan_scale.distributed.accelerator import BatchLayout, apply_layout, build_accelerator
from vegan_scale.engine.modules import build_modules
from vegan_scale.engine.objective import POT
from vegan_scale.engine.step import train_step
from vegan_scale.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]
BATCH = 100


def training_step(network: str, overrides: list[str], images: Path) -> Callable[[], torch.Tensor]:
    """One WAE-MMD optimizer step per call (the MNIST recipe on ``network``, batch 100); returns the loss."""
    cfg = load_experiment(
        ROOT / "configs/mnist/wae_mmd.yaml",
        [f"model.network={network}", "model.mlp.hidden=[512]", "penalty.mmd.scope=local", *overrides],
    )
    accelerator = build_accelerator(cfg.train.mixed_precision)
    layout = BatchLayout.derive(BATCH, 1, None)
    apply_layout(accelerator, layout, cfg.train.mixed_precision)
    modules, penalty = build_modules(cfg, accelerator, new=False)  # no encoder pre-training: the step alone
    run = SimpleNamespace(
        cfg=cfg, accelerator=accelerator, layout=layout, modules=modules, objective=POT.of(cfg, penalty), step=0
    )
    data = torch.from_numpy(np.load(images))
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    batches = len(data) // BATCH

    class Feed:  # what the data feed does with a batch: uint8 -> floats in [0, 1] on the device
        i = 0

        def next(self) -> torch.Tensor:
            start = self.i % batches * BATCH
            self.i += 1
            return data[start : start + BATCH].float().div_(255).contiguous(memory_format=memory_format)

    feed = Feed()

    def step() -> torch.Tensor:
        loss = train_step(run, feed, 1.0)["train/loss"]
        run.step += 1  # each step draws its own noise, as in training
        return loss

    return step
