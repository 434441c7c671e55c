"""Command line: ``vegan-scale train|config|shards|export|sync|eval|sample`` (also ``python -m vegan_scale``).

Overrides are OmegaConf dotlist items after the config path: ``vegan-scale train CONFIG train.max_steps=200``.
Exit codes are those of :class:`vegan_scale.errors.ExitCode`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, NoReturn

from vegan_scale import logs
from vegan_scale.cli_parser import parser
from vegan_scale.errors import (
    ConfigError,
    ExitCode,
    InterruptedRunError,
    PreemptedError,
    StorageError,
    VeganError,
    storage_error,
)
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

    if (args.reference or args.describe) and (args.config is not None or args.overrides):
        raise ConfigError(
            "--describe and --reference list every key of the schema, not a configuration's values: leave out the "
            "file and overrides, or drop the option to print the resolved configuration"
        )
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
    import dataclasses

    from vegan_scale import checkpoint, export
    from vegan_scale.evaluation.model_source import read_checkpoint
    from vegan_scale.registry import load_model
    from vegan_scale.rundir import RunDir

    run_dir = RunDir(args.checkpoint)
    # a run directory: its newest complete checkpoint
    read = run_dir.read_newest(read_checkpoint) if run_dir.checkpoints.is_dir() else read_checkpoint(args.checkpoint)
    # the weights checked against the network the configuration describes, which model.yaml will say
    model = load_model(read.config, read.weights, name=str(checkpoint.module_file(read.path)))
    print(export.write(args.out, model.state_dict(), dataclasses.asdict(read.config), read.step))


def _sync(args: argparse.Namespace) -> None:
    from vegan_scale.experiment import load_stored_experiment
    from vegan_scale.rundir import RunDir
    from vegan_scale.tracking.mlflow_run import resolve_uri
    from vegan_scale.tracking.sync import sync

    run_dir = RunDir(args.run_dir)
    if not run_dir.is_run():
        raise ConfigError(f"{args.run_dir} is not a run directory (it has no {run_dir.config.name})")
    cfg = load_stored_experiment(run_dir.config)
    uri = args.uri or resolve_uri(cfg.tracking.uri, Path(cfg.run.root))
    run_id = sync(run_dir, cfg, uri)
    print(f"{args.run_dir}: MLflow run {run_id} at {uri} is up to date")


def _eval(args: argparse.Namespace) -> None:
    from vegan_scale import export
    from vegan_scale.distributed.accelerator import build_accelerator, shutdown
    from vegan_scale.evaluation.model_source import open_model
    from vegan_scale.evaluation.protocol import EvalSettings, Shares, evaluate_source
    from vegan_scale.rundir import RunDir

    accelerator = build_accelerator("no")  # under `accelerate launch`, every process evaluates its share
    try:
        source = open_model(args.source, accelerator.device)
        run_dir = RunDir(source.run_dir) if source.run_dir else None
        out = args.out or (run_dir.eval_json if run_dir else args.source / export.EVAL_FILE)
        _refuse_unwritable(out, accelerator, replaces_only_an_evaluation=args.out is not None)
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
    print(f"wrote {result.write(out, {'weights': str(source.weights), 'step': source.step})}")
    if run_dir is not None and source.config.tracking.backend != "none":
        _log_eval(source, run_dir, out)


def _refuse_unwritable(out: Path, accelerator: Any, replaces_only_an_evaluation: bool) -> None:
    """Refuses, on every process together, an eval.json the main process could not write, before the evaluation:
    the write comes after minutes of it, and a read-only run directory or model store failed only then. An --out
    (``replaces_only_an_evaluation``) may replace an earlier evaluation, never another file (a checkpoint's), nor
    add a file to an export or a checkpoint."""
    import torch

    from vegan_scale.atomic import unwritable

    refusals = (None, StorageError, ConfigError)  # the verdict: an index here, the main process's
    why, verdict = None, 0
    if accelerator.is_main_process:
        why = unwritable(out)
        verdict = 0 if why is None else 1
        if why is None and replaces_only_an_evaluation:
            why = _not_for_an_evaluation(out)
            verdict = 2 if why else 0
    verdict = int(accelerator.gather(torch.tensor([verdict], device=accelerator.device)).max())
    if verdict:
        raise refusals[verdict](
            f"{out} cannot be written ({why or 'by the main process'}); nothing was evaluated. Pass --out FILE to "
            "write the evaluation elsewhere (a run's MLflow run gets its metrics all the same)"
        )


_EXPORT_ONLY = (
    "for an export's own files only: any other file there makes the next export into it refuse the directory (a "
    "run's, at the end of its training)"
)


def _not_for_an_evaluation(out: Path) -> str | None:
    """Why an evaluation may not be written at ``out`` (an --out), if it may not."""
    if not _an_evaluation(out):
        return "a file that is no evaluation is there; name a new file or an earlier evaluation's"
    if what := _kept_by_training(out.parent, out.name):
        return f"{out.parent} is {what}"
    return None


def _kept_by_training(directory: Path, name: str = "") -> str:
    """Why other files (or the file ``name``) may not go into ``directory`` ("" where they may): an export holds
    only its own files (export.write), so that nothing else is read as part of it, and a checkpoint is deleted whole
    when its run keeps only its newest (grids written there were lost without a word)."""
    from vegan_scale import export
    from vegan_scale.rundir import RunDir, is_complete

    place, own = directory.resolve(), name in export.OWN_FILES  # an export's evaluation goes beside it
    run = RunDir(place.parent)
    if run.is_run() and run.export == place and not own:
        return f"the export of the run {run.path}, {_EXPORT_ONLY}"
    if any(os.path.lexists(directory / f) for f in (export.MODEL_FILE, export.CONFIG_FILE)) and not own:
        return f"an export, {_EXPORT_ONLY}"
    run = RunDir(place.parent.parent)
    if is_complete(place) or (run.is_run() and run.checkpoints == place.parent):
        return "a checkpoint, which its run deletes whole when it keeps only its newest (checkpoint.keep_last_k)"
    return ""


def _an_evaluation(path: Path) -> bool:
    """Whether ``path`` is absent or holds an evaluation (eval.json: its "model" and "real" metrics)."""
    from vegan_scale import stored_json

    if not os.path.lexists(path):
        return True
    try:
        record = stored_json.load(path)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"model", "real"} <= record.keys()


def _log_eval(source: Any, run_dir: Any, report: Path) -> None:
    """The evaluation's ``report`` (eval.json), into the run's MLflow run."""
    from vegan_scale.tracking.mlflow_run import resolve_uri
    from vegan_scale.tracking.sync import log_evaluation

    uri = resolve_uri(source.config.tracking.uri, run_dir.path.parent.parent)  # <run.root>/<experiment>/<name>
    try:
        run_id = log_evaluation(run_dir, uri, report)
    except Exception as e:  # eval.json holds everything; a tracking failure must not hide the result
        logs.say(
            f"warning: metrics not logged to MLflow at {uri}: {str(e).splitlines()[0][:300]}; "
            f"`vegan-scale sync {run_dir.path}` sends them once it answers"
        )
        return
    print(f"logged the evaluation to MLflow run {run_id} at {uri}")


def _sample(args: argparse.Namespace) -> None:
    from vegan_scale.evaluation.grids import test_images_needed, write_figures
    from vegan_scale.evaluation.model_source import open_model

    if what := _kept_by_training(args.out):
        raise ConfigError(f"--out {args.out} is {what}; choose another directory")
    source = open_model(args.source)
    images = source.test_images(test_images_needed(args.grid), args.test_data)
    for path in write_figures(source.model, images.float() / 255, args.out, args.grid, args.seed):
        print(path)


def _index_shards(args: argparse.Namespace) -> None:
    from vegan_scale.data.write import index_shards

    for directory in args.directories:
        sizes = index_shards(directory)
        print(f"{directory}: {len(sizes)} shards, {sum(sizes.values())} samples; wrote sizes.json and .tar.idx files")


def _sweep(args: argparse.Namespace) -> None:
    from vegan_scale import sweep

    sweep.command(args.grid, count=args.count, task=args.task, here=args.here, jobs=args.jobs)


COMMANDS = {
    "train": _train,
    "config": _config,
    "shards": _shards,
    "index-shards": _index_shards,
    "export": _export,
    "sync": _sync,
    "eval": _eval,
    "sample": _sample,
    "sweep": _sweep,
}

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
        COMMANDS[args.command](args)
    except (PreemptedError, InterruptedRunError) as e:
        logs.say(f"stopped: {e}")
        return int(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without a checkpoint
        logs.say("interrupted")
        return int(ExitCode.INTERRUPTED)
    except VeganError as e:
        logs.say(f"error: {e}")
        return int(e.exit_code)
    except OSError as e:  # a path given that cannot be used (--out under a file, no permission): named, no traceback
        if e.filename is None:
            raise
        logs.say(f"error: {e.filename}: {e.strerror}")
        return int(ExitCode.STORAGE if storage_error(e) else ExitCode.USAGE)
    return int(ExitCode.OK)


def run() -> NoReturn:
    """The program's process (``vegan-scale``, ``python -m vegan_scale``): :func:`main`, then :func:`leave` with its
    exit code. A crash (an exception that is not a VeganError) ends as Python ends it."""
    leave(main())
