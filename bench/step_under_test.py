"""vegan_scale's training step on in-memory images, for the benchmarks: the engine's own step function and setup,
with the data feed replaced by batches cut from a tensor already on the device (the loader is measured on its own,
in loader.py)."""

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


def training_step(
    network: str,
    overrides: list[str],
    images: Path,
    config: str = "configs/mnist/wae_mmd.yaml",
    batch: int = BATCH,
) -> Callable[[], torch.Tensor]:
    """One WAE-MMD optimizer step per call (the recipe ``config`` on ``network``, batch ``batch``) on the images of
    the .npy file ``images`` (uint8, [n, C, H, W]); returns the loss."""
    cfg = load_experiment(
        ROOT / config,
        [
            f"model.network={network}",
            "model.mlp.hidden=[512]",
            "penalty.mmd.scope=local",
            f"train.global_batch_size={batch}",
            *overrides,
        ],
    )
    accelerator = build_accelerator(cfg.train.mixed_precision)
    layout = BatchLayout.derive(batch, 1, None)
    apply_layout(accelerator, layout, cfg.train.mixed_precision)
    modules, penalty = build_modules(cfg, accelerator, new=False)  # no encoder pre-training: the step alone
    run = SimpleNamespace(
        cfg=cfg, accelerator=accelerator, layout=layout, modules=modules, objective=POT.of(cfg, penalty), step=0
    )
    data = torch.from_numpy(np.load(images)).to(accelerator.device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    batches = len(data) // batch
    symmetric = cfg.data.input_range == "symmetric"

    class Feed:  # what the data feed does with a batch: uint8 -> floats in the model's range
        i = 0

        def next(self) -> torch.Tensor:
            start = self.i % batches * batch
            self.i += 1
            x = data[start : start + batch].float()
            x = x.mul_(2 / 255).sub_(1) if symmetric else x.div_(255)
            return x.contiguous(memory_format=memory_format)

    feed = Feed()

    def step() -> torch.Tensor:
        loss = train_step(run, feed, 1.0)["train/loss"]
        run.step += 1  # each step draws its own noise, as in training
        return loss

    return step
