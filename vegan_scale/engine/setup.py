"""Everything a training run needs, built from the configuration in dependency order.

The Accelerator first (it knows the world size), then the batch layout, the run directory (named by the main
process and shared), the data, the model, penalty and optimizers, and finally the tracker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

import vegan_scale
from vegan_scale.config.load import to_yaml
from vegan_scale.costs import reconstruction_cost
from vegan_scale.data.index import ShardIndex, read_index
from vegan_scale.data.pipeline import TrainStream, load_images
from vegan_scale.data.shardio import RetryPolicy
from vegan_scale.distributed import deepspeed_support, trainable
from vegan_scale.distributed.accelerator import BatchLayout, apply_layout, build_accelerator
from vegan_scale.distributed.trainable import Trainable
from vegan_scale.engine import resume, rundir
from vegan_scale.engine.objective import Cost
from vegan_scale.errors import ConfigError, DataError
from vegan_scale.penalties.base import LatentPenalty
from vegan_scale.priors import Prior
from vegan_scale.registry import PENALTIES, build_model, build_penalty, build_prior
from vegan_scale.tracking import METRICS_FILE, Tracker, as_params, check_reachable, resolve_experiment, resolve_uri

log = logging.getLogger("vegan_scale")


@dataclass
class Run:
    """The parts of one training run, as the loop uses them."""

    cfg: Any
    accelerator: Accelerator
    layout: BatchLayout
    run_dir: Path
    stream: TrainStream  # yields micro-batches
    total_steps: int  # optimizer steps
    start_step: int  # the step a continued run starts after (0 for a new run)
    autoencoder: Trainable
    penalty: LatentPenalty
    critic: Trainable | None  # the latent critic of adversarial penalties
    prior: Prior
    cost: Cost
    eval_images: torch.Tensor  # this process's share of the evaluation images
    originals: torch.Tensor  # test images shown beside their reconstructions
    prior_noise: torch.Tensor  # fixed prior sample for the sample grids
    tracker: Tracker | None  # main process only
    tracking_uri: str | None

    step: int = 0  # the last step completed, kept current by the loop (for the exit status)

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    @property
    def steps_per_epoch(self) -> float:
        return self.stream.batches_per_epoch / self.layout.accumulation


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
    m = cfg.model
    default = rundir.default_run_name(
        cfg.penalty.kind, m.network, m.latent_dim, cfg.train.global_batch_size, cfg.optim.lr
    )
    name = [cfg.run.name or default]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return Path(cfg.run.root) / cfg.run.experiment / name[0]


def _adam(params: Any, lr: float, cfg: Any) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=o.fused)


def _tags(accelerator: Accelerator, cfg: Any) -> dict[str, str]:
    """What a person filters runs by: the code (version, commit), the recipe, how it was launched, which job."""
    tags = {
        "vegan_scale.version": vegan_scale.__version__,
        "dist.type": str(accelerator.distributed_type.value),
        "dist.world_size": str(accelerator.num_processes),
        "recipe": f"{cfg.penalty.kind}/{cfg.cost.kind}/{cfg.model.network}",
        **_git_tags(),
    }
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        tags["dist.zero_stage"] = str(accelerator.state.deepspeed_plugin.zero_stage)
    for variable, tag in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_RESTART_COUNT", "slurm.restart_count")):
        if variable in os.environ:
            tags[tag] = os.environ[variable]
    return tags


def _git_tags() -> dict[str, str]:
    """The commit of the checkout vegan_scale runs from (MLflow shows ``mlflow.source.git.commit`` on the run's
    page) and whether it had uncommitted changes; nothing when the code is not in a git checkout or git is absent
    (an installed package, a container image)."""
    source = Path(vegan_scale.__file__).resolve().parent
    try:
        commit = _git(source, "rev-parse", "HEAD")
        dirty = bool(_git(source, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def _train_stream(cfg: Any, accelerator: Accelerator, layout: BatchLayout) -> tuple[TrainStream, int]:
    """This process's stream of batches and the run's total steps."""
    d = cfg.data
    index = _shards(d.train, "data.train", _image_shape(cfg), d.train_weights, skip_missing=d.on_error == "skip")
    stream = TrainStream(
        index,
        _image_shape(cfg),
        layout.micro,
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
    total_steps = math.ceil(cfg.train.epochs * stream.batches_per_epoch / layout.accumulation)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    return stream, total_steps


def _image_shape(cfg: Any) -> tuple[int, int, int]:
    return cfg.data.channels, cfg.data.image_size, cfg.data.image_size


def _tracker(
    cfg: Any, accelerator: Accelerator, run_dir: Path, uri: str | None, resume_notes: list[str] | None
) -> Tracker:
    # with a local store, keep artifacts beside mlflow.db rather than in ./mlruns of whatever the cwd is
    artifact_root = Path(cfg.run.root).resolve() / "mlartifacts" if uri and uri.startswith("sqlite") else None
    tracker = Tracker(
        run_dir,
        uri=uri,
        experiment=resolve_experiment(cfg.tracking.experiment, cfg.run.experiment),
        run_name=run_dir.name,
        params=as_params(dataclasses.asdict(cfg)),
        tags=_tags(accelerator, cfg),
        artifact_root=artifact_root,
        resume_notes=resume_notes,
        close_timeout_s=cfg.tracking.close_timeout_s,
        system_metrics=cfg.tracking.system_metrics,
    )
    tracker.log_artifact(run_dir / "config.yaml")
    return tracker


def trained_modules(cfg: Any, accelerator: Accelerator) -> tuple[Trainable, LatentPenalty, Trainable | None]:
    """The auto-encoder and the penalty (with its critic, if any), built identically on every process and wrapped."""
    torch.manual_seed(cfg.run.seed)  # identical initial parameters on every process
    with _init_context(accelerator):  # under ZeRO-3 the auto-encoder is never whole on one process
        model = build_model(cfg)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()
    penalty = build_penalty(cfg)
    wrap = functools.partial(trainable.prepare, accelerator)
    autoencoder = wrap("autoencoder", model, _adam(model.parameters(), cfg.optim.lr, cfg))
    critic = None
    if penalty.critic is not None:
        critic = wrap("critic", penalty.critic, _adam(penalty.critic.parameters(), cfg.penalty.adversarial.lr, cfg))
        penalty.critic_parameters = critic.frozen_parameters
    return autoencoder, penalty, critic


def _init_context(accelerator: Accelerator) -> Any:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return contextlib.nullcontext()
    trainable.select_plugin(accelerator, "autoencoder")
    return deepspeed_support.init_context(accelerator.state.deepspeed_plugin)


def _evaluation_data(
    cfg: Any, accelerator: Accelerator, prior: Prior
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(this process's share of the evaluation images, the originals of the reconstruction grid, the fixed prior
    sample of the sample grid); every process evaluates its share, so that ZeRO-3's collective forward works."""
    world, shape = accelerator.num_processes, _image_shape(cfg)
    images = load_images(_shards(cfg.data.test, "data.test", shape), shape, cfg.eval.num_samples)[0]
    usable = len(images) - len(images) % world  # equal shares: every process runs the same forward passes
    images = images[:usable].to(accelerator.device).float() / 255
    noise_rng = torch.Generator(accelerator.device).manual_seed(cfg.run.seed)
    prior_noise = prior.sample(cfg.eval.grid_size**2, device=accelerator.device, generator=noise_rng)
    return images[accelerator.process_index :: world], images[: cfg.eval.grid_size**2 // 2], prior_noise


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / rundir.EXIT_STATUS).exists() or (run_dir / METRICS_FILE).exists()


def build_run(cfg: Any) -> Run:
    """Build every part; the run directory is written last, once nothing can fail on bad input any more."""
    started_at = time.time()
    validate(cfg)
    models = ("autoencoder", "critic") if PENALTIES[cfg.penalty.kind].trains_critic else ("autoencoder",)
    accelerator = build_accelerator(cfg.train.mixed_precision, models, cfg.train.collective_timeout_s)
    rundir.setup_console_logging(accelerator.process_index)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    layout = BatchLayout.derive(cfg.train.global_batch_size, accelerator.num_processes, cfg.train.micro_batch_size)
    apply_layout(accelerator, layout, cfg.train.mixed_precision)
    run_dir = _run_dir(cfg, accelerator)
    resume_from = resume.locate(cfg.train.resume, run_dir, accelerator)
    if cfg.train.resume == "never" and _holds_run(run_dir):
        raise ConfigError(
            f"run directory {run_dir} already holds a run; choose another run.name, or continue it "
            "with train.resume=auto"
        )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    config = dataclasses.asdict(cfg)
    notes = resume.check_policy(resume_from, config, accelerator.num_processes, deepspeed) if resume_from else None
    continuing = resume_from is not None or _holds_run(run_dir)  # over an attempt that saved no checkpoint yet
    stream, total_steps = _train_stream(cfg, accelerator, layout)
    autoencoder, penalty, critic = trained_modules(cfg, accelerator)
    if cfg.train.init_from and resume_from is None:
        resume.start_from_export(Path(cfg.train.init_from), autoencoder, config)
    prior = build_prior(cfg)
    eval_images, originals, prior_noise = _evaluation_data(cfg, accelerator, prior)
    torch.manual_seed(cfg.run.seed + 1 + accelerator.process_index)  # per-process prior and encoder noise
    start_step = 0
    if resume_from is not None:
        start_step = resume.restore(resume_from, [m for m in (autoencoder, critic) if m], accelerator)

    tracker = uri = None
    if accelerator.is_main_process:
        rundir.prepare(run_dir, to_yaml(cfg), start_step if continuing else None, started_at)
        uri = resolve_uri(cfg.tracking.uri, Path(cfg.run.root)) if cfg.tracking.backend == "mlflow" else None
        if uri:
            check_reachable(uri, cfg.tracking.on_unreachable)
        tracker = _tracker(cfg, accelerator, run_dir, uri, (notes or []) if continuing else None)
    accelerator.wait_for_everyone()
    cost = functools.partial(reconstruction_cost, kind=cfg.cost.kind, scale=cfg.cost.scale)
    return Run(
        cfg,
        accelerator,
        layout,
        run_dir,
        stream,
        total_steps,
        start_step,
        autoencoder,
        penalty,
        critic,
        prior,
        cost,
        eval_images,
        originals,
        prior_noise,
        tracker,
        uri,
    )
