"""Continuing a run from a checkpoint: which one, whether the configuration may continue it, and restoring it.

Resume policy. A continuation must compute what the interrupted run would have computed, so the settings that
shape the model, the optimisation or the data order must equal the checkpoint's; the ones that only bound or
observe the run may change:

* may change: ``train.max_steps``, ``train.epochs`` (how long), ``train.check_every``,
  ``train.collective_timeout_s``, ``train.resume``, ``train.init_from``, ``data.read_attempts``,
  ``data.stall_timeout_s``, and the ``eval``,
  ``checkpoint``, ``tracking`` and ``run.root`` settings;
* everything else is refused with the list of differing keys, notably the network, prior, penalty, optimizer,
  batch, precision, seed and data (``data.num_workers`` included: the batch order is defined per worker).

The world size may change only for checkpoints without DeepSpeed (weights and optimizer state are whole), with a
warning that the data order then differs from an uninterrupted run's; a ZeRO checkpoint holds one shard per
process and is refused at another world size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from vegan_scale import checkpoint, export
from vegan_scale.config.load import flat_keys
from vegan_scale.distributed.trainable import Trainable
from vegan_scale.errors import ConfigError
from vegan_scale.rundir import COMPLETE, RunDir, is_complete

log = logging.getLogger("vegan_scale")

MAY_CHANGE_PREFIXES = ("eval.", "checkpoint.", "tracking.", "run.root")
MAY_CHANGE = frozenset(
    {
        "train.max_steps",
        "train.epochs",
        "train.check_every",
        "train.collective_timeout_s",
        "train.resume",
        "train.init_from",
        "data.read_attempts",
        "data.stall_timeout_s",
    }
)


def locate(resume: str, run_dir: RunDir, accelerator: Accelerator) -> Path | None:
    """The checkpoint to continue from, chosen by the main process and shared: it alone looks at the directory,
    since processes on different nodes may see a shared file system at different moments."""
    choice = [None]
    if accelerator.is_main_process:
        choice = [_choose(resume, run_dir)]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if isinstance(choice[0], str) and choice[0].startswith("error:"):
        raise ConfigError(choice[0].removeprefix("error:"))
    return Path(choice[0]) if choice[0] else None


def _choose(resume: str, run_dir: RunDir) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        newest = run_dir.newest_checkpoint()
        return str(newest) if newest else None
    if not is_complete(Path(resume)):
        return (
            f"error:train.resume={resume} is not a complete checkpoint directory (…/checkpoints/step_N with a "
            f"{COMPLETE} file); half-written checkpoints are never loaded"
        )
    return str(Path(resume))


def check_policy(path: Path, config: dict[str, Any], world_size: int, deepspeed: bool) -> list[str]:
    """Refuse a continuation the policy forbids; returns the allowed changes, as "key: old -> new"."""
    saved = flat_keys(yaml.safe_load((path / checkpoint.CONFIG).read_text()))
    current = flat_keys(config)
    changed = {k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)}
    refused = sorted(k for k in changed if k not in MAY_CHANGE and not k.startswith(MAY_CHANGE_PREFIXES))
    if refused:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in refused)
        raise ConfigError(
            f"cannot continue {path} with a different {', '.join(refused)} ({details}). These shape the "
            "model, the optimisation or the data order; start a new run (train.init_from=EXPORT starts "
            "one from a model's weights) or restore the checkpoint's values"
        )
    state = checkpoint.read_state(path)
    if state["world_size"] != world_size:
        if state["deepspeed"]:
            raise ConfigError(
                f"{path} holds DeepSpeed ZeRO shards for {state['world_size']} processes; continue it "
                f"with {state['world_size']} processes, or export it and start a new run from the export"
            )
        log.warning(
            "continuing a %d-process checkpoint with %d processes: the data order from here on differs from "
            "an uninterrupted run's",
            state["world_size"],
            world_size,
        )
    if deepspeed != state["deepspeed"]:
        raise ConfigError(
            f"{path} was saved {'with' if state['deepspeed'] else 'without'} DeepSpeed; continue it "
            "the same way, or export it and start a new run from the export"
        )
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(changed)]


def restore(path: Path, modules: list[Trainable], accelerator: Accelerator) -> int:
    """Collective: load every module's weights and optimizer state, this process's random generators and the
    gradient scaler from the checkpoint at ``path``; returns the step it was saved at."""
    for module in modules:
        module.load(path)
    rank = accelerator.process_index
    if checkpoint.rank_state_file(path, rank).exists():
        checkpoint.restore_rank_state(path, rank)
    scaler = checkpoint.read_scaler(path)
    if accelerator.scaler is not None and scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    state = checkpoint.read_state(path)
    log.info("continuing from %s (step %d)", path, state["step"])
    return int(state["step"])


def start_from_export(directory: Path, autoencoder: Trainable, config: dict[str, Any]) -> None:
    """Collective: a new run's auto-encoder takes the weights of an exported model of the same network."""
    export.check_compatible(directory, config)
    weights, _ = export.read(directory)
    autoencoder.load_weights(weights)
    log.info("starting from the exported weights in %s", directory)
