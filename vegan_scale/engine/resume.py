"""Continuing a run from a checkpoint: which one, whether the configuration may continue it, and restoring it.

Resume policy. A continuation must compute what the interrupted run would have computed, so the settings that
shape the model, the optimisation or the data order must equal the checkpoint's; the ones that only bound or
observe the run may change:

* may change: ``train.max_steps``, ``train.epochs`` (how long), ``train.check_every``,
  ``train.collective_timeout_s``, ``train.resume``, ``train.init_from``, ``data.read_attempts``,
  ``data.stall_timeout_s``, ``data.num_workers`` (the batches are the same at any worker count), the ``eval``,
  ``checkpoint`` and ``tracking`` settings, where the run lies (``run.root``, ``run.experiment``, ``run.name``:
  a run directory moved or renamed), and where its data lies (``data.train``, when the shards are the same by name,
  order and count: copied to another cluster's storage or a laptop; ``data.test``);
* everything else is refused with the list of differing keys, notably the network, prior, penalty, optimizer,
  batch, precision, seed and data.

The world size and the distribution mode (one process, DDP, ZeRO-2, ZeRO-3) may change: the checkpoint holds
whole weights and optimizer state by parameter name, the data order and every sample's random numbers are functions
of the step alone, so the continuation computes what the interrupted run would have (batch-norm statistics, which
each process keeps for its own samples, aside). The change is logged and recorded with the other notes.

Damage. A checkpoint is loaded whole or not at all: every file its ``state.json`` lists must be there with its
size, then every process reads (and checks) everything it needs, and only when all processes could does any
state change. With ``train.resume=auto`` a checkpoint that fails is named with the file and the reason, and the
previous complete one is tried, with a warning; a checkpoint named by ``train.resume=PATH`` is refused (exit 2).
When no checkpoint of the run directory loads, the run refuses to start (exit 2) rather than start over on top of
its results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from vegan_scale import checkpoint, export
from vegan_scale.config.load import flat_keys
from vegan_scale.config.yaml_file import read_yaml
from vegan_scale.distributed.accelerator import distribution_mode
from vegan_scale.distributed.trainable import Trainable
from vegan_scale.errors import CheckpointError, ConfigError, RunRefusedError
from vegan_scale.experiment import ExperimentConfig
from vegan_scale.rundir import COMPLETE, RunDir, complete_checkpoints, is_complete, named_step

log = logging.getLogger("vegan_scale")

DEFAULTS = flat_keys(dataclasses.asdict(ExperimentConfig()))
MAY_CHANGE_PREFIXES = ("eval.", "checkpoint.", "tracking.", "run.root", "run.experiment", "run.name")
MAY_CHANGE = frozenset(
    {
        "train.max_steps",
        "train.epochs",
        "train.check_every",
        "train.collective_timeout_s",
        "train.ddp_bucket_mb",
        "train.resume",
        "train.init_from",
        "data.read_attempts",
        "data.stall_timeout_s",
        "data.num_workers",
        "data.train",  # where the shards lie: same_data checks that they are the same shards
        "data.test",  # what evaluations read
    }
)


def locate(resume: str, run_dir: RunDir, accelerator: Accelerator) -> list[Path]:
    """The checkpoints to try, in order (newest first for ``auto``; the one named, for a path), chosen by the main
    process and shared: it alone looks at the directory, since processes on different nodes may see a shared file
    system at different moments."""
    choice: list[Any] = [None]
    if accelerator.is_main_process:
        choice = [_choose(resume, run_dir)]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if isinstance(choice[0], str):
        raise ConfigError(choice[0])
    return [Path(p) for p in choice[0]]


def _choose(resume: str, run_dir: RunDir) -> list[str] | str:
    """The candidates as strings, or an error message."""
    if resume == "never":
        return []
    if resume == "auto":
        return [str(p) for p in reversed(complete_checkpoints(run_dir.checkpoints))]
    if not is_complete(Path(resume)):
        return (
            f"train.resume={resume} is not a complete checkpoint directory (…/checkpoints/step_N with a "
            f"{COMPLETE} file); half-written checkpoints are never loaded"
        )
    path, step = Path(resume), named_step(Path(resume))
    if step is None:  # a copy under a name of its own (a backup): its state says the step; damage is said later
        with contextlib.suppress(CheckpointError):
            step = checkpoint.read_state(path)["step"]
    newer = [p.name for p in complete_checkpoints(run_dir.checkpoints) if step is not None and named_step(p) > step]
    if newer:  # wherever it lies, pruning would take the new checkpoints, and resume=auto go back to the newest
        return (
            f"train.resume={resume} is older than the run's newest checkpoints ({', '.join(newer[-3:])}): a run "
            "continued from it writes its steps again while those stay the run's newest. Move them out of "
            f"{run_dir.checkpoints} first (to keep them), or continue from the newest with train.resume=auto"
        )
    return [str(path.resolve())]  # as the main process sees it: the others may start in other directories


def check_policy(path: Path, config: dict[str, Any], world_size: int, mode: str) -> list[str]:
    """Refuse a continuation the policy forbids; returns the allowed changes, as "key: old -> new"."""
    try:
        saved = flat_keys(read_yaml(path / checkpoint.CONFIG))
    except (OSError, ConfigError, AttributeError) as e:  # a non-mapping has no items
        raise CheckpointError(f"{path / checkpoint.CONFIG} cannot be read ({e}): the checkpoint is damaged") from None
    current = flat_keys(config)
    # a key the checkpoint does not name did not exist when it was written: the run had the key's default
    saved = {**{k: v for k, v in DEFAULTS.items() if k not in saved}, **saved}
    changed = {k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)}
    refused = sorted(k for k in changed if k not in MAY_CHANGE and not k.startswith(MAY_CHANGE_PREFIXES))
    if refused:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in refused)
        raise RunRefusedError(
            f"cannot continue {path} with a different {', '.join(refused)} ({details}). These shape the "
            "model, the optimisation or the data order; start a new run (train.init_from=EXPORT starts "
            "one from a model's weights) or restore the checkpoint's values"
        )
    state = checkpoint.read_state(path)
    notes = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(changed)]
    saved_layout, layout = (state["world_size"], state.get("mode", "?")), (world_size, mode)
    if saved_layout != layout:
        change = "{} process(es) ({}) -> {} process(es) ({})".format(*saved_layout, *layout)
        log.info("continuing a checkpoint of %s: the data order and each sample's noise follow the step", change)
        notes.append(f"distribution: {change}")
    return notes


def same_data(path: Path, state: dict[str, Any], data: tuple[str, str], on_error: str) -> None:
    """The training shards must be those the checkpoint was written over (their names, in order, and counts),
    wherever they lie now: the data order and the epochs' ends follow them, and shards written again in the same
    place (other shards, other counts) would continue the run on another order without a word. Refused; in
    ``data.on_error=skip``, where shards missing at start are passed over, a warning. ``data``: the shards as
    :func:`vegan_scale.engine.job.training_shards` and ``training_data`` describe them now (checkpoints of
    earlier versions hold the second, by path, or nothing)."""
    written = state.get("data")
    if written is None or written in data:
        return
    message = (
        f"the training shards are not those {path.name} was written over (then {written}; now {data[0]}): the "
        "data order follows them"
    )
    if on_error == "skip":
        log.warning("%s; continuing (data.on_error=skip)", message)
        return
    raise RunRefusedError(
        f"cannot continue {path}: {message}. Restore the shards it was trained on, or start a new run "
        "(train.init_from=EXPORT starts one from a model's weights)"
    )


@dataclass(frozen=True)
class Resumed:
    path: Path
    step: int
    notes: list[str]  # the allowed setting changes, "key: old -> new"
    state: dict[str, Any]  # the checkpoint's state.json


def restore(
    candidates: list[Path],
    named: bool,
    modules: list[Trainable],
    accelerator: Accelerator,
    config: dict[str, Any],
    data: tuple[str, str],
) -> Resumed | None:
    """Collective: restore the first candidate that loads whole (see the module's docstring): every module's
    weights and optimizer state, this process's random generators and the gradient scaler. ``named``: the user
    named the one candidate (``train.resume=PATH``), which is then refused rather than passed over. ``data``: the
    training shards as read now (:func:`same_data`), to compare with the checkpoint's."""
    mode = distribution_mode(accelerator)
    failures = []
    for path in candidates:
        problem, state, read = None, None, None
        try:
            state = checkpoint.verify(path)
            notes = check_policy(path, config, accelerator.num_processes, mode)
            same_data(path, state, data, config["data"]["on_error"])
            read = _read(path, state, modules, accelerator)
        except CheckpointError as e:
            problem = f"process {accelerator.process_index}: {e}"
        problems = [p for p in gather_object([problem]) if p]
        if not problems:
            _apply(path, read, modules, accelerator)
            log.info("continuing from %s (step %d)", path, state["step"])
            return Resumed(path, int(state["step"]), notes, state)
        if named:
            raise CheckpointError(f"cannot continue from {path}: {'; '.join(problems)}")
        log.warning("checkpoint %s cannot be loaded (%s); trying the one before it", path, "; ".join(problems))
        failures.append(f"{path.name} ({'; '.join(problems)})")
    if failures:
        raise CheckpointError(
            f"no checkpoint of {candidates[0].parent} loads: {'; '.join(failures)}. Restore them, or move them out "
            "of the way to start the run over"
        )
    return None


def _read(path: Path, state: dict[str, Any], modules: list[Trainable], accelerator: Accelerator) -> tuple:
    """Everything this process restores from ``path``, read and checked, nothing applied yet."""
    rank = accelerator.process_index
    rng = checkpoint.read_rank_state(path, rank) if rank < state["world_size"] else None
    scaler = checkpoint.read_scaler(path) if accelerator.scaler is not None else None
    return [module.read(path) for module in modules], rng, scaler


def _apply(path: Path, read: tuple, modules: list[Trainable], accelerator: Accelerator) -> None:
    module_states, rng, scaler = read
    for module, module_state in zip(modules, module_states, strict=True):
        module.load(path, module_state)
    if rng is not None:
        checkpoint.apply_rank_state(rng)
    if scaler is not None:
        accelerator.scaler.load_state_dict(scaler)


def start_from_export(directory: Path, autoencoder: Trainable, config: dict[str, Any]) -> None:
    """Collective: a new run's auto-encoder takes the weights of an exported model of the same network."""
    export.check_compatible(directory, config, f"train.init_from={directory} was exported from a different network")
    weights, _ = export.read(directory)
    autoencoder.load_weights(weights)
    log.info("starting from the exported weights in %s", directory)
