"""Encoder pre-training, the official WAE code's ``e_pretrain``: before the first step of a new run, the encoder
alone is fitted (its own Adam at the run's learning rate) so that the mean and covariance of its codes match the
prior's, for at most ``train.encoder_pretrain_steps`` steps (the official 200) or until the moment loss is below
0.1.

It keeps the run exact and its data untouched: the images come from a pool read from the training shards apart
from the training stream (which starts where it would have), the batches and prior samples from a generator of
its own seeded by the run's seed, and a continued run never pre-trains again (its checkpoint holds the result).
Every process computes the same pre-training; under ZeRO-3 the encoder is gathered for it and rank 0's result is
partitioned back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from vegan_scale.data.images import load_images
from vegan_scale.data.index import read_index
from vegan_scale.distributed import deepspeed_support
from vegan_scale.errors import NonFiniteLossError
from vegan_scale.experiment import image_shape, read_retry, stall_timeout_s
from vegan_scale.models.autoencoder import AutoEncoder
from vegan_scale.penalties.moments import moment_matching_loss

log = logging.getLogger("vegan_scale")

TOLERANCE = 0.1  # the official code stops below this moment loss
POOL_BATCHES = 20  # the pool of training images holds this many pre-training batches (or the whole set)


def pretrain_encoder(
    model: AutoEncoder,
    pool: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    betas: tuple[float, float],
    seed: int,
    stopping: Callable[[], bool] = lambda: False,
) -> tuple[int, float]:
    """Fit the encoder's code moments to the prior's on batches of ``pool`` (uint8 images); returns (steps taken,
    last moment loss). A stop asked for (``stopping``) ends it early: the run then stops before its first step,
    with nothing saved, and a large network's pre-training took most of a launcher's 30 s grace."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.encoder.parameters(), lr=lr, betas=betas)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    loss = torch.tensor(float("inf"))
    for step in range(1, steps + 1):
        ids = torch.randperm(len(pool), generator=generator)[: min(batch, len(pool))]
        x = model.to_model(pool[ids].to(device, dtype) / 255)
        z_p = model.prior.sample(len(ids), generator=generator, dtype=dtype).to(device)
        loss = moment_matching_loss(model.encode(x).z, z_p)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"encoder pre-training: the moment loss became {loss.item()} at pre-training step {step}; lower "
                "optim.lr or set train.encoder_pretrain_steps=0"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < TOLERANCE or stopping():
            return step, loss.item()
    return steps, loss.item()


def pretrain(cfg: Any, model: AutoEncoder, stopping: Callable[[], bool] = lambda: False) -> None:
    """Pre-train ``model``'s encoder as the configuration asks (nothing when train.encoder_pretrain_steps is 0)."""
    t = cfg.train
    if not t.encoder_pretrain_steps:
        return
    shape = image_shape(cfg)
    index = read_index(cfg.data.train, image_shape=shape, key="data.train", skip_missing=cfg.data.on_error == "skip")
    wanted = POOL_BATCHES * t.encoder_pretrain_batch
    pool = load_images(
        index,
        shape,
        wanted,
        read_retry(cfg),
        stall_timeout_s=stall_timeout_s(cfg),
        on_error=cfg.data.on_error,
        stopping=stopping,
    )[0]
    with deepspeed_support.gathered(model.encoder, modify=True):
        steps, loss = pretrain_encoder(
            model,
            pool,
            t.encoder_pretrain_steps,
            t.encoder_pretrain_batch,
            cfg.optim.lr,
            tuple(cfg.optim.betas),
            cfg.run.seed,
            stopping,
        )
    log.info("encoder pre-trained: %d step(s), moment loss %.4f (on %d images)", steps, loss, len(pool))
