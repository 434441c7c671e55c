"""The experiment schema: one documented dataclass per section.

The sections that depend on what is registered (networks under ``model``, penalties under ``penalty``) are
assembled by :func:`assemble` from the registry, which sits above this package; everything here is plain data.
Topology (world size, ranks, nodes) is never part of an experiment: the config states the global batch and the
launcher decides how many processes share it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vegan_scale.config.fields import (
    FLOAT32,
    FLOAT32_MAX,
    POSITIVE,
    POSITIVE_FLOAT32,
    SECONDS,
    Range,
    Requirement,
    at_least,
    param,
    section,
)

SCHEMA_VERSION = 1


@dataclass
class RunConfig:
    root: str = param(
        "runs",
        "Directory holding run directories and the local MLflow store (mlflow.db); in a job of several nodes, on a "
        "file system every node shares (checked at start).",
    )
    experiment: str = param(
        "default",
        "Experiment name: the run directory's parent, and the MLflow experiment unless tracking.experiment or "
        "$MLFLOW_EXPERIMENT_NAME names another. Letters, digits, '.', '_' and '-' (one directory name).",
    )
    name: str | None = param(
        None,
        "Run name (run directory and MLflow run); default '<penalty>-<network>-z<latent>-gb<global batch>-lr<lr>-"
        "<timestamp>', e.g. mmd-conv-z8-gb100-lr0.001-20250101-120000, with -2, -3, ... where a run of that second has "
        "the name. Letters, digits, '.', '_' and '-'.",
    )
    seed: int = param(
        0,
        "Seed of parameters, prior samples and data order. At most 2^32 - 1: torch's CPU generator keeps the low 32 "
        "bits of a seed, so a larger one would repeat a smaller one's run.",
        bounds=Range(0, 2**32 - 1),
    )


@dataclass
class DataConfig:
    train: str = param(
        ".data/shards/mnist/train",
        "Training shards: a directory written by 'vegan-scale shards' (it holds sizes.json), or a brace pattern of "
        "paths or URLs (data-{000000..000127}.tar, https://..., pipe:...); several sources joined by '::'.",
    )
    train_weights: list[float] | None = param(
        None,
        "Sampling weight of each '::' source of data.train (resampled mode only); null weighs all equally.",
        bounds=POSITIVE_FLOAT32,
    )
    test: str = param(".data/shards/mnist/test", "Test shards, same forms as data.train; used for evaluation.")
    mode: str = param(
        "epoch",
        "epoch: every sample once per epoch, the shards in a seeded order; resampled: shards drawn with "
        "replacement, sources weighted by data.train_weights. Either way the global batch of each step is the "
        "same at every number of processes and loader workers (docs/design.md, Data order).",
        choices=("epoch", "resampled"),
    )
    epoch_samples: int | None = param(
        None, "Resampled mode: samples per epoch; null uses the data set's size from sizes.json.", bounds=at_least(1)
    )
    on_error: str = param(
        "raise",
        "Bad data (truncated shard, undecodable image, wrong shape, missing shard): raise stops the run with a "
        "message naming shard and sample; skip counts each bad sample by reason, logs the counts and puts the "
        "next good sample of the epoch in its place.",
        choices=("raise", "skip"),
    )
    read_attempts: int = param(
        5, "Tries of a shard read that fails transiently (network, 5xx), with backoff.", bounds=at_least(1)
    )
    stall_timeout_s: float | None = param(
        None,
        "Seconds a process may wait for its next batch (a read that never returns: a stuck network file system, a "
        "FIFO) before the run stops with the shard named (exit 69); below train.collective_timeout_s. null: half "
        "of train.collective_timeout_s.",
        bounds=SECONDS,
    )
    image_size: int = param(28, "Side of the square images in the shards.", bounds=at_least(1))
    input_range: str = param(
        "unit",
        "The range the model sees pixels in: unit, [0, 1] with a sigmoid decoder (the official MNIST recipes); "
        "symmetric, [-1, 1] with a tanh decoder (the official CelebA recipes' input_normalize_sym). The squared "
        "cost is four times larger in [-1, 1], so lambda means something else in each.",
        choices=("unit", "symmetric"),
    )
    channels: int = param(1, "Image channels in the shards (1 for MNIST, 3 for RGB).", bounds=Range(1, 4))
    num_workers: int = param(
        1, "Loader processes per training process; 0 decodes in the training process.", bounds=at_least(0)
    )
    shuffle_buffer: int = param(
        2000,
        "The span of the sample shuffle: each batch takes one sample from each of global-batch-size stretches of "
        "the epoch spread over this many samples (0 or 1: batches of consecutive samples).",
        bounds=at_least(0),
    )


@dataclass
class PriorConfig:
    kind: str = param("gaussian", "Prior P_Z.", choices=("gaussian", "sphere", "box"))
    scale: float = param(
        1.0, "gaussian: variance sigma^2 of each coordinate; sphere: radius; box: half-width.", bounds=POSITIVE_FLOAT32
    )


@dataclass
class CostConfig:
    kind: str = param("l2sq", "Reconstruction cost c(x, G(z)).", choices=("l2sq", "l2", "l1", "bernoulli"))
    scale: float | None = param(
        None,
        "Factor on the per-image cost; null uses the WAE code's (0.05 l2sq, 0.2 l2, 0.02 l1, 1 bernoulli).",
        bounds=POSITIVE_FLOAT32,
    )


@dataclass
class OptimConfig:
    lr: float = param(
        1e-3, "Adam learning rate of the auto-encoder (0 leaves the weights as they are).", bounds=FLOAT32
    )
    betas: list[float] = param(
        [0.5, 0.999], "Adam betas (the WAE recipes use beta1 = 0.5).", bounds=Range(0, 1, high_inclusive=False)
    )
    weight_decay: float = param(0.0, "Decoupled weight decay (AdamW); 0 gives plain Adam.", bounds=at_least(0))
    fused: bool = param(
        True,
        "Fused AdamW: one kernel updates every parameter, instead of a loop of small operations per tensor "
        "(docs/performance.md); false where the device has no fused implementation.",
    )
    lr_milestones: list[float] = param(
        [30.0, 50.0], "Epochs at which the learning rate changes (WAE recipe).", bounds=at_least(0)
    )
    lr_factors: list[float] = param(
        [0.5, 0.1],
        "Learning rate from each milestone on, as a fraction of optim.lr "
        "(the official code: halved at epoch 30, then divided by 5 again at epoch 50, 0.1 of the base).",
        bounds=POSITIVE,
    )


@dataclass
class TrainConfig:
    global_batch_size: int = param(100, "Samples per optimizer step, summed over all processes.", bounds=at_least(1))
    micro_batch_size: int | None = param(
        None,
        "Largest batch one process computes at once; its share of the global batch is then accumulated over "
        "several micro-batches. null: no accumulation.",
        bounds=at_least(1),
    )
    epochs: float = param(  # bounded: 1e308 overflowed counting the steps, even beside train.max_steps
        100.0,
        "Length of the run in passes over the training set (at most 1e12: more than any run; train.max_steps "
        "alone sets a run's length).",
        bounds=Range(0, 1e12, low_inclusive=False),
    )
    max_steps: int | None = param(
        None,
        "Upper bound on optimizer steps; the run ends at whichever of train.epochs and train.max_steps comes first.",
        bounds=at_least(1),
    )
    mixed_precision: str = param(
        "no",
        "Autocast precision of the networks; kernels and penalties stay float32. bf16 is faster only where the "
        "hardware computes it (an Ampere or later GPU; a CPU with AVX-512 BF16 or AMX): elsewhere it is emulated, "
        "slower than float32, and the run says so.",
        choices=("no", "bf16", "fp16"),
    )
    low_precision_weights: bool = param(
        False,
        "With mixed_precision=bf16, one process or DDP: the networks compute with a bf16 copy of their weights, "
        "refreshed from the float32 master weights after each optimizer step, instead of autocast casting every "
        "weight at every step (normalisation layers stay float32). The optimizer and checkpoints keep the float32 "
        "masters; gradients are taken, all-reduced and accumulated over micro-batches in bf16. docs/performance.md "
        "says what it buys.",
    )
    dtype: str = param(
        "float32",
        "Precision of the parameters, images and optimizer state; float64 (with mixed_precision=no) for checks of "
        "exactness, e.g. that a run continued on another number of processes ends where an uninterrupted one does.",
        choices=("float32", "float64"),
    )
    grad_compression: str = param(
        "none",
        "DDP only: all-reduce the gradients in bf16 (half the bytes on the wire; each process's gradients are "
        "rounded to bf16 before the sum, the sum is taken back to the parameters' precision). docs/scaling.md says "
        "when it pays.",
        choices=("none", "bf16"),
    )
    ddp_bucket_mb: int = param(
        25, "DDP only: size of the gradient buckets all-reduced while the backward pass runs (MB).", bounds=at_least(1)
    )
    check_every: int = param(
        50, "Steps between the checks all processes agree on (stop, non-finite loss).", bounds=at_least(1)
    )
    deterministic: bool = param(
        False,
        "Use deterministic algorithms (slower; for exact reproduction). On CPU this also fixes each convolution's "
        "form by rule instead of timing both forms at the first step (vegan_scale/models/layers.py).",
    )
    channels_last: bool = param(
        False,
        "Keep images and convolution activations in channels-last memory layout (faster convolutions on CPUs "
        "with oneDNN and on GPUs with tensor cores; see docs/performance.md).",
    )
    compile: bool = param(
        False,
        "torch.compile the auto-encoder (a minute of compilation, then faster steps where the network is "
        "small enough for Python overhead to matter; see docs/performance.md).",
    )
    resume: str = param(
        "auto",
        "auto: continue from the newest complete checkpoint in the run directory, if there is one; never: refuse "
        "an existing run directory; or the path of a checkpoint directory (…/checkpoints/step_N) to continue from.",
    )
    init_from: str | None = param(
        None, "An exported model directory (model.safetensors + model.yaml) whose weights start a new run."
    )
    encoder_pretrain_steps: int = param(
        0,
        "Before the first step of a new run, fit the mean and covariance of the encoder's codes to the prior's for "
        "at most this many steps, stopping once the moment loss is below 0.1 (the official e_pretrain: 200); 0: "
        "no pre-training.",
        bounds=at_least(0),
    )
    encoder_pretrain_batch: int = param(
        1000, "Images (and prior samples) per pre-training step (official: 1000 MNIST, 256 CelebA).", bounds=at_least(2)
    )
    collective_timeout_s: float = param(
        600.0,
        "Seconds a process waits in a collective before deciding another process is lost (exit 69); bounds the "
        "hang when a rank dies without a launcher that stops the others.",
        bounds=SECONDS,
    )


@dataclass
class EvalConfig:
    every_steps: int = param(
        500,
        "Steps between evaluations (test reconstruction, sample and reconstruction "
        "grids); the last step is always evaluated.",
        bounds=at_least(1),
    )
    num_samples: int = param(
        1000,
        "Test images used for the reconstruction error and the latent MMD (which needs two) at each evaluation.",
        bounds=at_least(2),
    )
    grid_size: int = param(8, "Rows and columns of the sample and reconstruction grids.", bounds=Range(1, 100))


@dataclass
class CheckpointConfig:
    every_steps: int = param(
        1000, "Steps between checkpoints; the last step is always saved. 0 disables them.", bounds=at_least(0)
    )
    keep_last_k: int = param(2, "Complete checkpoints kept on disk; older ones are deleted.", bounds=at_least(1))


@dataclass
class TrackingConfig:
    backend: str = param("mlflow", "Where metrics and images go besides the run directory.", choices=("mlflow", "none"))
    uri: str | None = param(
        None, "MLflow tracking URI; null uses $MLFLOW_TRACKING_URI, else a sqlite file <run.root>/mlflow.db."
    )
    experiment: str | None = param(None, "MLflow experiment; null uses $MLFLOW_EXPERIMENT_NAME, else run.experiment.")
    system_metrics: bool = param(
        False,
        "Also log MLflow system metrics (CPU, memory, disk, network; GPU with pynvml) of the main process's node "
        "under system/, every 10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL).",
    )
    tags: dict[str, str] = param(
        {},
        "Extra MLflow run tags, e.g. tracking.tags.sweep=mnist-seeds (vegan-scale sweep sets sweep and sweep_task).",
    )
    register_as: str | None = param(
        None,
        "Also register the trained model (the run's MLflow model 'model') in MLflow's model registry under this name, "
        "as a new version; load it with vegan_scale.load('models:/NAME/VERSION').",
    )
    log_every: int = param(
        50,
        "Steps between metric flushes (means over the interval, one device sync each); each checkpoint and a stop "
        "also flush, so that a continued run's metrics miss no step.",
        bounds=at_least(1),
    )
    close_timeout_s: float = param(
        60.0,
        "At the end of a run, seconds to wait for updates the tracking server has not taken yet.",
        bounds=SECONDS,
    )
    on_unreachable: str = param(
        "error",
        "A tracking server that does not answer at start: error stops with exit code 2; continue trains anyway, "
        "keeping metrics in the run directory (send them later with `vegan-scale sync RUN_DIR`).",
        choices=("error", "continue"),
    )


@dataclass
class ModelBase:
    latent_dim: int = param(8, "Dimension d of the latent space.", bounds=at_least(1))
    encoder: str = param("deterministic", "Encoder Q(Z|X).", choices=("deterministic", "gaussian", "implicit"))
    decoder: str = param("deterministic", "Decoder G(Z).", choices=("deterministic", "gaussian"))
    noise_dim: int = param(8, "Noise inputs of the implicit encoder.", bounds=at_least(1))
    input_noise: float = param(
        0.0,
        "Deviation of the truncated normal noise added to the encoder's input while training (the official "
        "code's e_noise='add_noise': 0.01 in its MNIST and CelebA configs); 0: none.",
        bounds=Range(0, FLOAT32_MAX),
    )
    init_std: float | None = param(
        None,
        "Draw every weight from a normal of this deviation, biases zero (the official code's init_std, 0.0099999); "
        "null: PyTorch's default initialisation.",
        bounds=POSITIVE_FLOAT32,
    )


@dataclass
class PenaltyBase:
    weight: float = param(10.0, "Weight lambda of the latent penalty (0: a plain auto-encoder).", bounds=FLOAT32)
    weight_schedule: str = param(
        "constant",
        "constant: lambda stays penalty.weight; adaptive: every penalty.adaptive_every steps lambda <- 0.5 lambda + "
        "0.5 recon / |penalty| from that step's terms (the official lambda_schedule='adaptive').",
        choices=("constant", "adaptive"),
    )
    adaptive_every: int = param(1000, "Steps between updates of the adaptive lambda.", bounds=at_least(1))


# What one setting needs of another; the registry adds those of the registered penalties.
REQUIREMENTS = (
    Requirement("cost.kind", "bernoulli", "model.decoder", ("deterministic",)),
    Requirement("cost.kind", "bernoulli", "data.input_range", ("unit",)),  # pixel probabilities
    Requirement("train.dtype", "float64", "train.mixed_precision", ("no",)),
    Requirement("train.low_precision_weights", True, "train.mixed_precision", ("bf16",)),
    Requirement("train.low_precision_weights", True, "train.compile", (False,)),  # compiles the master, not the copy
)


def assemble(networks: dict[str, type], penalties: dict[str, type], requirements: tuple[Requirement, ...]) -> type:
    """The root schema, with one options section per registered network and penalty, carrying the rules across
    keys (``REQUIREMENTS``) that the loader checks."""

    def with_options(base: type, selector: str, doc: str, default: str, options: dict[str, type]) -> type:
        prefix = base.__name__.removesuffix("Base").lower()
        choose = (selector, str, param(default, doc, choices=tuple(options)))
        extra = [
            (key, cls, section(cls, f"Options used when {prefix}.{selector}={key}.")) for key, cls in options.items()
        ]
        return dataclasses.make_dataclass(
            base.__name__.removesuffix("Base") + "Config", [choose, *extra], bases=(base,)
        )

    model = with_options(ModelBase, "network", "Network of the encoder and decoder.", "conv", networks)
    penalty = with_options(PenaltyBase, "kind", "Latent penalty D_Z(Q_Z, P_Z).", "mmd", penalties)
    fields: list[tuple[str, Any, Any]] = [
        (
            "schema_version",
            int,
            param(SCHEMA_VERSION, "Version of this schema; configs from a newer one are refused.", bounds=at_least(1)),
        ),
        ("run", RunConfig, section(RunConfig, "Naming, output location and seed.")),
        ("data", DataConfig, section(DataConfig, "Training and test data.")),
        ("model", model, section(model, "Encoder, decoder and latent space.")),
        ("prior", PriorConfig, section(PriorConfig, "The prior P_Z.")),
        ("cost", CostConfig, section(CostConfig, "The reconstruction cost c.")),
        ("penalty", penalty, section(penalty, "The latent penalty and its weight.")),
        ("optim", OptimConfig, section(OptimConfig, "Optimizer and learning-rate schedule.")),
        ("train", TrainConfig, section(TrainConfig, "Length, batch and precision of training.")),
        ("eval", EvalConfig, section(EvalConfig, "Periodic evaluation during training.")),
        ("checkpoint", CheckpointConfig, section(CheckpointConfig, "Periodic checkpoints.")),
        ("tracking", TrackingConfig, section(TrackingConfig, "Metric tracking.")),
    ]
    return dataclasses.make_dataclass(
        "ExperimentConfig", fields, namespace={"REQUIREMENTS": REQUIREMENTS + requirements}
    )
