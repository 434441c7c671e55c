"""Evaluation during training: test reconstruction error over every process's share, and the figures.

The full evaluation of a trained model (FID, KID, precision/recall, sharpness, latent MMD) is
``vegan_scale.evaluation``; this one is cheap enough to run every ``eval.every_steps``.

Every process evaluates its own share of the evaluation images and the sums are added across processes, so that
the whole set counts (not the main process's share) and ZeRO-3's collective forward passes run on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image

from vegan_scale.data.images import load_images
from vegan_scale.data.index import read_index
from vegan_scale.engine.objective import Cost
from vegan_scale.errors import ConfigError
from vegan_scale.evaluation.grids import figures
from vegan_scale.experiment import image_shape, read_retry, stall_timeout_s
from vegan_scale.models.autoencoder import AutoEncoder
from vegan_scale.penalties.kernel_mmd import mmd
from vegan_scale.priors import Prior


@dataclass(frozen=True)
class EvalSet:
    """What every evaluation of a run looks at."""

    images: torch.Tensor  # this process's share of the evaluation images, floats in [0, 1] on the device
    originals: torch.Tensor  # test images shown beside their reconstructions (and interpolated between)
    prior_noise: torch.Tensor  # a fixed prior sample: successive sample grids show the same codes decoded
    grid: int
    prior_reference: torch.Tensor  # a fixed prior sample as large as the whole evaluation set, for the latent MMD

    @classmethod
    def load(
        cls, cfg: Any, accelerator: Accelerator, prior: Prior, stopping: Callable[[], bool] = lambda: False
    ) -> EvalSet:
        """Every process takes an equal share of the first ``eval.num_samples`` test images (equal, so that all
        run the same forward passes, which ZeRO-3's collective forward needs)."""
        world, shape = accelerator.num_processes, image_shape(cfg)
        skip = cfg.data.on_error == "skip"
        index = read_index(cfg.data.test, image_shape=shape, key="data.test", skip_missing=skip)
        images = load_images(
            index,
            shape,
            cfg.eval.num_samples,
            read_retry(cfg),
            stall_timeout_s=stall_timeout_s(cfg),
            on_error=cfg.data.on_error,
            stopping=stopping,
        )[0]
        usable = len(images) - len(images) % world
        if usable < 2:  # the latent MMD's estimate needs two codes: it failed at the first evaluation, after training
            raise ConfigError(
                f"evaluations need at least 2 test images, shared equally over {world} process(es); there are "
                f"{usable} of the {len(images)} read (eval.num_samples={cfg.eval.num_samples}, data.test="
                f"{cfg.data.test}): raise eval.num_samples, or give a larger test set"
            )
        images = images[:usable].to(accelerator.device).float() / 255
        grid = cfg.eval.grid_size
        noise_rng = torch.Generator(accelerator.device).manual_seed(cfg.run.seed)
        prior_noise = prior.sample(grid**2, device=accelerator.device, generator=noise_rng)
        reference = prior.sample(usable, device=accelerator.device, generator=noise_rng)
        share = images[accelerator.process_index :: world]
        return cls(share, images[: grid**2 // 2], prior_noise, grid, reference)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    figures: dict[str, Image.Image]  # by the key each is saved and logged under


@torch.no_grad()
def evaluate(
    model: AutoEncoder,
    cost: Cost,
    data: EvalSet,
    batch_size: int,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor],
    gather: Callable[[torch.Tensor], torch.Tensor],
) -> Evaluation:
    """Metrics over this process's share of the images summed over every process, and the figures. The latent
    MMD^2 (multi-scale IMQ) is between the codes of the whole set, gathered, and a fixed prior sample as large."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    totals = torch.zeros(3, dtype=torch.float64, device=data.images.device)  # cost, squared error, count
    codes = []
    for chunk in data.images.split(batch_size):
        x = model.to_model(chunk)
        out = model(x.to(dtype))
        recon = out.recon
        codes.append(out.codes.z.float())
        totals[0] += cost(x, recon).double().sum()  # in the model's range, as training computes it
        totals[1] += (model.to_images(recon.mean.float()) - chunk).pow(2).flatten(1).mean(dim=1).double().sum()
        totals[2] += len(chunk)
    totals = sum_over_processes(totals)
    # grid // 2 interpolation lines for grids under 4
    grids = figures(model, data.prior_noise, data.originals, data.originals[: 2 * data.grid], data.grid)
    model.train(was_training)
    metrics = {"eval/recon": (totals[0] / totals[2]).item(), "eval/mse": (totals[1] / totals[2]).item()}
    all_codes = gather(torch.cat(codes))
    metrics["eval/latent_mmd"] = mmd(all_codes, data.prior_reference.float(), "imq", model.prior.variance).item()
    return Evaluation(metrics, grids)
