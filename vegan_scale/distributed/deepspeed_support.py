"""DeepSpeed specifics, kept beside the Accelerator builder and imported only when DeepSpeed runs.

* One ``DeepSpeedPlugin`` (hence one engine) per trained module: WAE-GAN's latent critic has an optimizer of its
  own, and accelerate's multi-plugin API gives each its engine (selected by name before ``prepare``).
* The launch files' DeepSpeed JSON has no micro-batch: the loader is not prepared by accelerate, so the micro-batch
  and accumulation are written into each plugin's config at run time.
* accelerate 1.x calls into transformers for an integration vegan_scale does not use; without transformers
  installed that call is replaced by a no-op.
* Under ZeRO-3, parameters live in pieces across ranks: large models are built inside ``zero.Init`` (never whole
  on one rank), and a module's full parameters are gathered only for a moment when needed (critic in the encoder's
  step, export).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import DeepSpeedPlugin
from torch import nn

from vegan_scale import checkpoint


def plugins(models: tuple[str, ...]) -> DeepSpeedPlugin | dict[str, DeepSpeedPlugin]:
    """DeepSpeed plugins from the launcher's config (environment), one per trained module."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError("DeepSpeed was requested by the launcher but is not installed: pip install -e '.[deepspeed]'")
    if importlib.util.find_spec("transformers") is None:
        DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None  # a transformers integration vegan_scale doesn't use
    made = {name: DeepSpeedPlugin(zero3_init_flag=False) for name in models}
    return made[models[0]] if len(models) == 1 else made


def configure(plugin: DeepSpeedPlugin, micro: int, accumulation: int, world_size: int, mixed_precision: str) -> None:
    """Write what the JSON leaves to run time into a plugin's config: the batch layout and the precision."""
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro * accumulation * world_size
    for precision in ("bf16", "fp16"):
        if config.get(precision, {}).get("enabled") == "auto":
            config[precision]["enabled"] = mixed_precision == precision


def zero_stage(plugin: DeepSpeedPlugin) -> int:
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def init_context(plugin: DeepSpeedPlugin) -> contextlib.AbstractContextManager:
    """Under ZeRO-3, build parameters partitioned from the start; otherwise nothing."""
    if zero_stage(plugin) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=plugin.deepspeed_config)


@contextlib.contextmanager
def gathered(module: nn.Module, modify: bool = False) -> Iterator[None]:
    """Inside the block, a ZeRO-3 module's parameters are whole on every rank (collective); otherwise a no-op.
    With ``modify``, what rank 0 writes into them is partitioned back to every rank at the end."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def local_values(param: torch.Tensor, rank: int) -> torch.Tensor:
    """The values of a parameter this process holds: all of it, or under ZeRO-3 its shard without the padding that
    makes shards equal (uninitialised memory)."""
    shard = getattr(param, "ds_tensor", None)
    if shard is None:
        return param.detach()
    valid = max(0, min(shard.numel(), param.ds_numel - rank * shard.numel()))
    return shard.detach().flatten()[:valid]


def frozen_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters as constants (gathered whole under ZeRO-3), for a functional call."""
    with gathered(module):
        zero3 = any(hasattr(p, "ds_id") for p in module.parameters())
        return {n: (p.detach().clone() if zero3 else p.detach()) for n, p in module.named_parameters()}


def save_engine(engine: object, directory: Path) -> None:
    """Collective: an engine's own checkpoint (module, ZeRO-sharded optimizer state) under ``directory``."""
    engine.save_checkpoint(str(directory), tag="engine", save_latest=False)


def match_buffers_to_parameters(module: nn.Module) -> None:
    """DeepSpeed's half-precision modes convert a module's parameters but, below ZeRO-3, not its floating buffers
    (batch-norm statistics), which then clash with the half-precision activations."""
    dtype = next(module.parameters()).dtype
    for buffer in module.buffers():
        if buffer.is_floating_point() and buffer.dtype != dtype:
            buffer.data = buffer.data.to(dtype)


def _allowed_globals() -> list[type]:
    """The non-tensor objects DeepSpeed's checkpoint files hold (found by loading ZeRO-2 and ZeRO-3 checkpoints
    with ``weights_only=True``): the loss scaler, ZeRO-3's stage enum and ZeRO-1/2's fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_engine_files(directory: Path, rank: int) -> None:
    """Read the files of an engine checkpoint this process will load (its own ZeRO shards; the shared model states
    on rank 0), without executing code, so that a damaged or planted file is found before any engine is touched.
    A CheckpointError names the file."""
    allowed = _allowed_globals()
    for file in sorted(directory.rglob("*.pt")):
        own = f"_rank_{rank}_" in file.name
        shared = "zero_pp_rank_" not in file.name
        if own or (shared and rank == 0):
            checkpoint.safe_load(file, allowed, map_location="cpu")


def load_engine(engine: object, directory: Path) -> None:
    """Collective: restore an engine from ``save_engine``'s files without executing code from them.

    DeepSpeed reads its files with ``torch.load(weights_only=False)``; for this load its checkpoint engine reads
    them with ``weights_only=True`` and an allowlist of the three classes they contain instead, so a planted
    pickle is refused (``pickle.UnpicklingError``) rather than run.
    """
    allowed = _allowed_globals()

    def safe_load(path: str, map_location: object = None) -> object:
        return checkpoint.safe_load(Path(path), allowed, map_location)

    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load
    checkpoint_engine.load = safe_load
    try:
        path, _ = engine.load_checkpoint(
            str(directory), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=False
        )
    finally:
        checkpoint_engine.load = original
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
