"""Everything a training run needs, built from the configuration in dependency order.

The Accelerator first (it knows the world size), then the batch layout, the run directory (named by the main
process and shared), the data, the model, penalty and optimizers, and finally the tracker.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

import vegan_scale
from vegan_scale.config.load import to_yaml
from vegan_scale.costs import reconstruction_cost
from vegan_scale.data.index import ShardIndex, read_index
from vegan_scale.data.pipeline import TrainStream, load_images
from vegan_scale.data.shardio import RetryPolicy
from vegan_scale.dist import BatchLayout, build_accelerator
from vegan_scale.engine import rundir
from vegan_scale.engine.objective import Cost
from vegan_scale.errors import ConfigError, DataError
from vegan_scale.models.autoencoder import AutoEncoder
from vegan_scale.penalties.base import LatentPenalty
from vegan_scale.priors import Prior
from vegan_scale.registry import build_model, build_penalty, build_prior
from vegan_scale.tracking import Tracker, flatten, resolve_uri

log = logging.getLogger("vegan_scale")


@dataclass
class Run:
    """The parts of one training run, as the loop uses them."""

    cfg: Any
    accelerator: Accelerator
    layout: BatchLayout
    run_dir: Path
    stream: TrainStream
    total_steps: int
    model: torch.nn.Module  # wrapped for distribution
    optimizer: torch.optim.Optimizer
    penalty: LatentPenalty
    critic: torch.nn.Module | None  # wrapped for distribution
    critic_optimizer: torch.optim.Optimizer | None
    prior: Prior
    cost: Cost
    eval_images: torch.Tensor | None  # main process only
    prior_noise: torch.Tensor | None  # fixed prior sample for the sample grids, main process only
    tracker: Tracker | None  # main process only
    tracking_uri: str | None

    @property
    def unwrapped_model(self) -> AutoEncoder:
        return self.accelerator.unwrap_model(self.model)


def validate(cfg: Any) -> None:
    """Checks that span several keys; the schema has already checked each value's type and choices."""
    o = cfg.optim
    if len(o.lr_milestones) != len(o.lr_factors) or list(o.lr_milestones) != sorted(o.lr_milestones):
        raise ConfigError(
            "optim.lr_milestones must be increasing and as long as optim.lr_factors "
            f"(got {list(o.lr_milestones)} and {list(o.lr_factors)})"
        )
    positive = {
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.check_every": cfg.train.check_every,
        "tracking.log_every": cfg.tracking.log_every,
        "eval.every_steps": cfg.eval.every_steps,
        "model.latent_dim": cfg.model.latent_dim,
        "train.epochs": cfg.train.epochs,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive or null, got {cfg.train.max_steps}")
    if cfg.cost.kind == "bernoulli" and cfg.model.decoder == "gaussian":
        raise ConfigError("cost.kind=bernoulli models pixels as Bernoulli; it cannot use model.decoder=gaussian")


def _shards(
    spec: str, key: str, shape: tuple[int, int, int], weights: list[float] | None = None, skip_missing: bool = False
) -> ShardIndex:
    index = read_index(spec, weights, skip_missing=skip_missing)
    if index.image_shape is not None and tuple(index.image_shape) != shape:
        raise DataError(
            f"{key}={spec} holds images of shape {tuple(index.image_shape)} (C, H, W) but the config "
            f"says {shape}; set data.channels and data.image_size to match"
        )
    return index


def _run_dir(cfg: Any, accelerator: Accelerator) -> Path:
    """The run directory; the main process picks the default name (it contains a timestamp) for everyone."""
    name = [cfg.run.name or rundir.default_run_name(cfg.penalty.kind, cfg.model.network, cfg.model.latent_dim)]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return Path(cfg.run.root) / cfg.run.experiment / name[0]


def _adam(params: Any, lr: float, cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)


def _tags(accelerator: Accelerator, cfg: Any) -> dict[str, str]:
    tags = {
        "vegan_scale.version": vegan_scale.__version__,
        "dist.type": str(accelerator.distributed_type.value),
        "dist.world_size": str(accelerator.num_processes),
        "recipe": f"{cfg.penalty.kind}/{cfg.cost.kind}/{cfg.model.network}",
    }
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def _train_stream(cfg: Any, accelerator: Accelerator, layout: BatchLayout) -> tuple[TrainStream, int]:
    """This process's stream of batches and the run's total steps."""
    d = cfg.data
    index = _shards(d.train, "data.train", _image_shape(cfg), d.train_weights, skip_missing=d.on_error == "skip")
    stream = TrainStream(
        index,
        _image_shape(cfg),
        layout.per_process,
        cfg.run.seed,
        accelerator.process_index,
        accelerator.num_processes,
        d.num_workers,
        d.shuffle_buffer,
        d.mode,
        d.epoch_samples,
        d.on_error,
        RetryPolicy(attempts=d.read_attempts),
    )
    total_steps = math.ceil(cfg.train.epochs * stream.batches_per_epoch)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    return stream, total_steps


def _image_shape(cfg: Any) -> tuple[int, int, int]:
    return cfg.data.channels, cfg.data.image_size, cfg.data.image_size


def _tracker(cfg: Any, accelerator: Accelerator, run_dir: Path) -> tuple[Tracker, str | None]:
    uri = resolve_uri(cfg.tracking.uri, Path(cfg.run.root)) if cfg.tracking.backend == "mlflow" else None
    # with a local store, keep artifacts beside mlflow.db rather than in ./mlruns of whatever the cwd is
    artifact_root = Path(cfg.run.root).resolve() / "mlartifacts" if uri and uri.startswith("sqlite") else None
    tracker = Tracker(
        run_dir,
        uri=uri,
        experiment=cfg.run.experiment,
        run_name=run_dir.name,
        params=flatten(dataclasses.asdict(cfg)),
        tags=_tags(accelerator, cfg),
        artifact_root=artifact_root,
    )
    tracker.log_artifact(run_dir / "config.yaml")
    return tracker, uri


def build_run(cfg: Any) -> Run:
    """Build every part; the run directory is created last, once nothing can fail on bad input any more."""
    validate(cfg)
    accelerator = build_accelerator(cfg.train.mixed_precision)
    rundir.setup_console_logging(accelerator.is_main_process)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    layout = BatchLayout.derive(cfg.train.global_batch_size, accelerator.num_processes)
    run_dir = _run_dir(cfg, accelerator)
    if (run_dir / rundir.EXIT_STATUS).exists() or (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; choose another run.name")
    stream, total_steps = _train_stream(cfg, accelerator, layout)

    torch.manual_seed(cfg.run.seed)  # identical initial parameters on every process
    model, penalty, prior = build_model(cfg), build_penalty(cfg), build_prior(cfg)
    optimizer = _adam(model.parameters(), cfg.optim.lr, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    critic = critic_optimizer = None
    if penalty.critic is not None:
        critic_optimizer = _adam(penalty.critic.parameters(), cfg.penalty.adversarial.lr, cfg)
        critic, critic_optimizer = accelerator.prepare(penalty.critic, critic_optimizer)
    torch.manual_seed(cfg.run.seed + 1 + accelerator.process_index)  # per-process prior and encoder noise

    eval_images = prior_noise = tracker = uri = None
    if accelerator.is_main_process:
        test_index = _shards(cfg.data.test, "data.test", _image_shape(cfg))
        images = load_images(test_index, _image_shape(cfg), cfg.eval.num_samples)[0]
        eval_images = images.to(accelerator.device).float() / 255
        noise_rng = torch.Generator(accelerator.device).manual_seed(cfg.run.seed)
        prior_noise = prior.sample(cfg.eval.grid_size**2, device=accelerator.device, generator=noise_rng)
        rundir.prepare(run_dir, to_yaml(cfg))
        tracker, uri = _tracker(cfg, accelerator, run_dir)
    accelerator.wait_for_everyone()
    cost = functools.partial(reconstruction_cost, kind=cfg.cost.kind, scale=cfg.cost.scale)
    return Run(
        cfg,
        accelerator,
        layout,
        run_dir,
        stream,
        total_steps,
        model,
        optimizer,
        penalty,
        critic,
        critic_optimizer,
        prior,
        cost,
        eval_images,
        prior_noise,
        tracker,
        uri,
    )
