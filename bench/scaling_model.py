"""A model of data-parallel step time against node count for the shipped networks (docs/scaling.md).

    .venv/bin/python bench/scaling_model.py          # a few seconds: nothing is trained

Measured here: each network's parameters and its training FLOPs per sample (forward and backward of the
auto-encoder, counted by torch's FlopCounterMode on the meta device, so the 1.2B network costs no memory).
Assumed, and printed: the GPU (H100 SXM: 989 TFLOP/s dense bf16) and the fraction of it a step reaches, a floor
on a step's time (kernel launches and Python of a small step), NVLink inside a node, the network between nodes
(100, 200 or 400 Gb/s per node) and its per-message latency. From those:

    compute  t_c = max(floor, b * FLOPs per sample / (peak * utilisation))       (b: per-GPU batch)
    comm     t_m = 2 (g-1)/g * G / NVLink                                        (inside a node of g = 8 GPUs)
                 + 2 (N-1)/N * G / link + 2 (N-1) * latency                      (ring all-reduce between N nodes)
    step     t_c + t_m without overlap; t_c/3 + max(2 t_c/3, t_m) with DDP's overlap of the all-reduce with the
             backward pass (about two thirds of the FLOPs)

where G is the gradient bytes (4 per parameter, 2 with train.grad_compression=bf16). Scaling efficiency is
t_c / step: the fraction of each GPU's time spent computing. A network turns communication-bound at the first
node count where t_m exceeds the backward pass it can hide behind; the last column is the per-GPU batch whose
backward pass would hide the all-reduce of 64 nodes (the all-reduce does not grow with the batch). The last line
is the per-GPU batch the CelebA 64 conv network needs at 64 nodes on 400 Gb/s with bf16 gradients.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vegan_scale.experiment import load_experiment  # noqa: E402
from vegan_scale.registry import build_model  # noqa: E402

# Assumptions (no GPU here to measure them on): an H100 SXM node of 8 GPUs.
PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak
UTILISATION = 0.40  # fraction of the peak a large network's step reaches (bf16, well-fed)
STEP_FLOOR_S = 1e-3  # a small step's kernel launches and Python: its time whatever its FLOPs
GPUS_PER_NODE = 8
NVLINK_BYTES_S = 360e9  # effective all-reduce bus bandwidth inside a node (NCCL on NVLink 4)
LATENCY_S = 10e-6  # per step of a ring between nodes
LINKS_GBIT = (100, 200, 400)  # per node
NODES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Network:
    label: str
    config: str
    overrides: tuple[str, ...]
    batch: int  # per GPU


NETWORKS = (
    Network("MLP pair (MNIST)", "configs/mnist/wae_mmd.yaml", ("model.network=mlp", "model.mlp.hidden=[512]"), 100),
    Network("conv pair (pythae, MNIST)", "configs/mnist/wae_mmd.yaml", ("model.network=pythae_conv",), 100),
    Network("WAE conv (MNIST)", "configs/mnist/wae_mmd.yaml", (), 100),
    Network("WAE conv (CelebA 64)", "configs/celeba64/wae_mmd.yaml", (), 64),
    Network("ResNet 171M (CelebA 64)", "configs/celeba64/wae_mmd_resnet.yaml", (), 32),
    Network("ResNet 1.2B (CelebA 64)", "configs/celeba64/wae_mmd_resnet_xl.yaml", (), 8),
)


def measure(network: Network) -> tuple[int, float]:
    """(parameters, training FLOPs per sample) of the network's auto-encoder, counted on the meta device."""
    cfg = load_experiment(ROOT / network.config, list(network.overrides))
    with torch.device("meta"):
        model = build_model(cfg)
        x = torch.rand(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with FlopCounterMode(display=False) as counter:
        (model(x).recon.mean - x).square().sum().backward()
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2


def comm_time(grad_bytes: float, nodes: int, link_bytes_s: float) -> float:
    inside = 2 * (GPUS_PER_NODE - 1) / GPUS_PER_NODE * grad_bytes / NVLINK_BYTES_S
    between = 2 * (nodes - 1) / nodes * grad_bytes / link_bytes_s + 2 * (nodes - 1) * LATENCY_S
    return inside + between


def efficiency(compute: float, comm: float, overlap: bool) -> float:
    step = compute / 3 + max(2 * compute / 3, comm) if overlap else compute + comm
    return compute / step


def batch_to_hide(flops: float, comm: float) -> int:
    """The per-GPU batch whose backward pass (2/3 of its FLOPs) lasts as long as the all-reduce."""
    return math.ceil(1.5 * comm * PEAK_FLOPS * UTILISATION / flops)


def comm_bound_at(compute: float, grad_bytes: float, link_bytes_s: float) -> int | None:
    """The first node count (of 1 to 64) whose all-reduce outlasts the backward pass."""
    return next((n for n in range(1, 65) if comm_time(grad_bytes, n, link_bytes_s) > 2 * compute / 3), None)


def main() -> None:
    print(
        f"assumed: {PEAK_FLOPS / 1e12:.0f} TFLOP/s peak x {UTILISATION:.0%} utilisation, step floor "
        f"{STEP_FLOOR_S * 1e3:.1f} ms, {GPUS_PER_NODE} GPUs/node on NVLink at {NVLINK_BYTES_S / 1e9:.0f} GB/s, "
        f"{LATENCY_S * 1e6:.0f} us per ring step between nodes"
    )
    headline = None
    for network in NETWORKS:
        params, flops = measure(network)
        compute = max(STEP_FLOOR_S, network.batch * flops / (PEAK_FLOPS * UTILISATION))
        print(
            f"\n{network.label}: {params / 1e6:.2f}M parameters, {flops / 1e9:.3f} GFLOP per sample, per-GPU batch "
            f"{network.batch}: compute {compute * 1e3:.2f} ms/step, gradients {4 * params / 1e6:.0f} MB "
            f"(bf16: {2 * params / 1e6:.0f} MB)"
        )
        head = "".join(f"{n:>6d}" for n in NODES)
        print(f"  {'nodes of 8 GPUs:':34s}{head}   comm-bound from   batch to hide at 64")
        for gbit in LINKS_GBIT:
            link = gbit * 1e9 / 8
            for grad_bytes, dtype, overlap in ((4 * params, "fp32", True), (2 * params, "bf16", True),
                                               (4 * params, "fp32", False)):  # fmt: skip
                row = [efficiency(compute, comm_time(grad_bytes, n, link), overlap) for n in NODES]
                label = f"{gbit} Gb/s, {dtype}, {'overlap' if overlap else 'no overlap'}"
                line = f"  {label:34s}" + "".join(f"{e:6.0%}" for e in row)
                if overlap:
                    bound = comm_bound_at(compute, grad_bytes, link)
                    hide = batch_to_hide(flops, comm_time(grad_bytes, 64, link))
                    line += f"   {f'{bound} node(s)' if bound else 'beyond 64':15s}   {hide:>8d}"
                    if network.label.startswith("WAE conv (CelebA") and gbit == 400 and dtype == "bf16":
                        headline = hide
                print(line)
    print(
        f"\nheadline: the CelebA 64 conv network hides its all-reduce at 64 nodes (400 Gb/s, bf16 gradients) from "
        f"a per-GPU batch of {headline}"
    )


if __name__ == "__main__":
    main()
