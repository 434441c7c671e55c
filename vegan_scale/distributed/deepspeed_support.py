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
* Checkpoints hold whole tensors by parameter name in every mode (vegan_scale.checkpoint), through DeepSpeed's
  ``safe_get_full_*`` and ``safe_set_*`` accessors; before loading, the Adam state DeepSpeed creates lazily is
  created, and under ZeRO-3 each process sets its own partition.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator

import torch
from accelerate.utils import DeepSpeedPlugin
from torch import nn


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


def initialise(module: nn.Module, init: Callable[[nn.Module], None]) -> None:
    """Collective, for a module built inside ``zero.Init``: apply ``init`` to each of its submodules with that
    submodule's own parameters whole (rank 0's values partitioned back), in the order a plain module's
    initialisation visits them, so that its values are those the same seed gives a model built without ZeRO-3 (an
    initialisation run inside ``zero.Init`` sees empty partitions and does nothing)."""
    import deepspeed

    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                init(m)


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


def match_buffers_to_parameters(module: nn.Module) -> None:
    """DeepSpeed's half-precision modes convert a module's parameters but, below ZeRO-3, not its floating buffers
    (batch-norm statistics), which then clash with the half-precision activations."""
    dtype = next(module.parameters()).dtype
    for buffer in module.buffers():
        if buffer.is_floating_point() and buffer.dtype != dtype:
            buffer.data = buffer.data.to(dtype)


MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's state per parameter, besides its step count


def full_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's whole shape (a ZeRO-3 parameter's, not its shard's)."""
    return {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in module.state_dict(keep_vars=True).items()}


def _zero3(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def full_state(module: nn.Module, engine: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Collective, under DeepSpeed: the module's whole float32 weights (the optimizer's masters) with its buffers, and
    its Adam state by parameter name, gathered from the ZeRO partitions one parameter at a time (every process
    gets them; the main process writes them)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    step = _optimizer_step(engine)
    weights = {name: b.detach().clone() for name, b in module.named_buffers()}
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        weights[name] = safe_get_full_fp32_param(p).detach().cpu()
        if step is not None:
            state |= {f"{name}/{key}": safe_get_full_optimizer_state(p, key).detach().cpu() for key in MOMENTS}
            state[f"{name}/step"] = torch.tensor(step)
    return weights, state


def load_full_state(
    module: nn.Module, engine: object, weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> None:
    """Collective, under DeepSpeed: set the module's weights (the half-precision copies and the float32 masters)
    and Adam state from whole tensors, each process keeping its ZeRO partition, whatever world size and mode
    wrote them. Adam's state is created first where the engine has not stepped yet (DeepSpeed creates it lazily)."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    zero3 = _zero3(module)
    steps = {state[key].item() for key in state if key.endswith("/step")}
    moments = MOMENTS if steps else ()  # none before the first step
    if steps:
        _create_adam_state(engine, max(steps))
    for name, b in module.named_buffers():
        b.data.copy_(weights[name])
    for name, p in module.named_parameters():
        values = {"fp32": weights[name]} | {key: state[f"{name}/{key}"] for key in moments}
        if zero3:  # DeepSpeed's whole-tensor setters mis-slice the padded last partition: set this process's own
            part = _partition(p, values["fp32"])
            p.ds_tensor.data.copy_(part.to(p.ds_tensor.dtype))
            safe_set_local_fp32_param(p, part)
            for key in moments:
                safe_set_local_optimizer_state(p, _partition(p, values[key]), key)
        else:
            p.data.copy_(values["fp32"].to(p.dtype))
            safe_set_full_fp32_param(p, values["fp32"].to(p.device))
            for key in moments:
                safe_set_full_optimizer_state(p, values[key].to(p.device), key)


def _partition(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This process's ZeRO-3 partition of a whole tensor: its equal share of the flattened values, zero-padded."""
    size = param.partition_numel()
    start = torch.distributed.get_rank() * size
    flat = whole.flatten().to(param.ds_tensor.device, torch.float32)
    part = torch.zeros(size, dtype=torch.float32, device=flat.device)
    valid = max(0, min(size, flat.numel() - start))
    part[:valid] = flat[start : start + valid]
    return part


def _inner_optimizer(engine: object) -> torch.optim.Optimizer:
    """The torch optimizer a ZeRO optimizer steps over its float32 partitions."""
    zero = engine.optimizer
    return getattr(zero, "optimizer", zero)


def _optimizer_step(engine: object) -> float | None:
    """Adam's step count (the same for every partition), or None before the first step."""
    states = list(_inner_optimizer(engine).state.values())
    return float(states[0]["step"]) if states else None


def _create_adam_state(engine: object, step: float) -> None:
    """Give the engine's optimizer the Adam state a step would have created (zero moments at ``step``) for each of
    its float32 partitions (ZeRO-1/2's and ZeRO-3's, by their attribute names), and link ZeRO-1/2's per-parameter
    views to it, so that the setters have somewhere to write."""
    zero, inner = engine.optimizer, _inner_optimizer(engine)
    partitions = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    on_device = any(group.get("fused") or group.get("capturable") for group in inner.param_groups)
    for p in partitions:
        inner.state[p] = {
            "step": torch.tensor(step, dtype=torch.float32, device=p.device if on_device else "cpu"),
            **{key: torch.zeros_like(p, memory_format=torch.preserve_format) for key in MOMENTS},
        }
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link their views to the state lazily
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
