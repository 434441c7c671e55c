"""A run continued on another number of processes, or in another distribution mode, computes what an uninterrupted
run computes: real launches (gloo, CPU), a network without batch norm, float64 where the mode allows it.

Each chain trains steps 0-3 in one layout, 3-7 in a second and 7-10 in a third (one chain adds a fourth leg in
the layout of the third: a same-layout continuation), each leg continuing from the checkpoint the previous one
wrote at its end; its weights, optimizer state and per-step losses are compared with one uninterrupted run.
Equal per-step losses (to 1e-9 in float64) mean the same batches, sample by sample, and the same noise.

The legs are also the launch tests of launch/accelerate's CPU configurations for DDP, ZeRO-2 and ZeRO-3: each
leg's output names its mode and number of processes, and every checkpoint holds whole weights and Adam state by
parameter name (no engine's partition files).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.runkit import ddp, losses, run, single, train_args

pytestmark = pytest.mark.distributed

FINAL = 10  # steps of every run


def leg_ends(legs: int) -> list[int]:
    """The step each leg of a chain trains to: evenly spaced, the last at FINAL."""
    return [round(FINAL * (i + 1) / legs) for i in range(legs)]


FLOAT64 = ["train.dtype=float64", "train.encoder_pretrain_steps=0", "checkpoint.every_steps=100"]


def launch(layout: str, args: list[str]) -> tuple[list[str], str]:
    """The command of one layout (single, ddp2, ddp4, zero2 or zero3, the last two with 2 processes) and how its
    output names the processes."""
    if layout == "single":
        return single(args), "1 process(es) (NO)"
    if layout.startswith("ddp"):
        return ddp(args, processes=int(layout[3:])), f"{layout[3:]} process(es) (MULTI_CPU)"
    return ddp(args, f"cpu_{layout}.yaml"), "2 process(es) (DEEPSPEED)"


def train(
    shards: Path, root: Path, recipe: str, layout: str, steps: int, extra: list[str], modules: tuple[str, ...]
) -> tuple[Path, str]:
    """Train (or continue) the run under ``root`` to ``steps`` in ``layout``; its directory and output. The
    checkpoint it ends with holds one weights and one optimizer file per module, nothing else."""
    args = train_args(shards, root, "run", recipe, f"train.max_steps={steps}", "eval.every_steps=100", *extra)
    cmd, processes = launch(layout, args)
    proc = run(cmd, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and processes in output, output[-3000:]
    saved = root / "mnist" / "run" / "checkpoints" / f"step_{steps:08d}"
    weights = {f"{module}.{kind}" for module in modules for kind in ("safetensors", "optim.safetensors")}
    assert {p.name for p in saved.glob("*.safetensors")} == weights and not [p for p in saved.iterdir() if p.is_dir()]
    return root / "mnist" / "run", output


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(
        ((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)).item() for k in a
    )


def compare(chain: Path, reference: Path, modules: tuple[str, ...], tolerance: float) -> None:
    final = f"checkpoints/step_{FINAL:08d}"
    for module in modules:
        for suffix in ("safetensors", "optim.safetensors"):
            got, want = (load_file(d / final / f"{module}.{suffix}") for d in (chain, reference))
            assert relative_gap(got, want) < tolerance, (module, suffix, relative_gap(got, want))
    got, want = losses(chain), losses(reference)
    assert got.keys() == want.keys() == set(range(1, FINAL + 1))
    assert all(abs(got[s] - want[s]) <= tolerance * abs(want[s]) for s in want), (got, want)


FLOAT32 = ["train.encoder_pretrain_steps=0", "checkpoint.every_steps=100"]
CHAINS = [
    # recipe, the uninterrupted run's layout, the legs' layouts, settings, modules, relative tolerance
    ("wae_mmd", "single", ("ddp2", "single", "ddp4"), FLOAT64, ("autoencoder",), 1e-9),  # global MMD
    ("wae_gan", "single", ("ddp2", "single", "ddp2"), FLOAT64, ("autoencoder", "critic"), 1e-9),
    # DeepSpeed keeps float32 masters; float32 rounding differs between layouts, and Adam turns a rounding
    # difference in a near-zero gradient into one of up to the learning rate: hence the looser tolerance
    # ... and the last leg continues ZeRO-3 in the same layout, as a requeued job does; under ZeRO-3 WAE-GAN runs
    # two engines
    ("wae_gan", "zero2", ("zero2", "single", "zero3", "zero3"), FLOAT32, ("autoencoder", "critic"), 1e-3),
    ("wae_mmd", "single", ("zero3", "zero2"), FLOAT32, ("autoencoder",), 1e-3),
]


@pytest.mark.parametrize(
    ("recipe", "reference", "layouts", "extra", "modules", "tolerance"),
    CHAINS,
    ids=[f"{c[0]}-{'-'.join(c[2])}-vs-{c[1]}" for c in CHAINS],
)
def test_a_run_continued_in_other_layouts_ends_where_an_uninterrupted_one_does(
    tiny_shards_module: Path, tmp_path: Path, recipe, reference, layouts, extra, modules, tolerance
) -> None:
    uninterrupted, _ = train(tiny_shards_module, tmp_path / "reference", recipe, reference, FINAL, extra, modules)
    for leg, (layout, steps) in enumerate(zip(layouts, leg_ends(len(layouts)), strict=True)):
        chain, output = train(tiny_shards_module, tmp_path / "chain", recipe, layout, steps, extra, modules)
        if leg and layout != layouts[leg - 1]:  # the change of layout is said
            assert f"continuing a checkpoint of {2 if layouts[leg - 1] != 'single' else 1} process(es)" in output
    compare(chain, uninterrupted, modules, tolerance)
