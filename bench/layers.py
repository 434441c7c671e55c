"""Each convolution of the shipped conv networks: torch's kernel against vegan_scale's product form, and the form
each layer picks by timing on this machine.

    .venv/bin/python bench/layers.py          # about 5 minutes on 2 cores

vegan_scale.models.layers can compute a convolution as one matrix product over the filter's taps; which form is
faster depends on the CPU and the layer, so a CPU layer times both at its first call and keeps the faster
(``_products_pay``). For every layer where it chooses, in pythae's MNIST pair and the WAE paper's MNIST network
(batch 100, channels-last, forward and backward), in float32 and in bf16 (weights and input in bf16, as with
``train.low_precision_weights``), this prints the median of alternating rounds of each form and the one the layer
picked. The totals compare, per network and precision, the picked forms' time with the faster form of each layer
(the best a choice could do), with torch's kernels throughout, and with the fixed rule used under deterministic
algorithms. The last line is the worst picked-over-best ratio (target: at most 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vegan_scale.models import conv, layers, pythae_conv
from vegan_scale.models.base import NetworkSpec
from vegan_scale.models.options import ConvConfig, PythaeConvConfig

NETWORKS: list[tuple[str, NetworkSpec, object]] = [
    ("pythae pair", pythae_conv.SPEC, PythaeConvConfig()),
    ("WAE network", conv.SPEC, ConvConfig(width=128)),
]
SHAPE = (1, 28, 28)
TARGET = 1.05  # the picked forms' time over the best forms' time, at most


def chosen_layers(spec: NetworkSpec, options: object, batch: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """The network's convolutions that choose a form, each with its input's shape (one forward pass records it)."""
    encoder, _ = spec.encoder_body(options, SHAPE)
    decoder = spec.decoder_body(options, 8, SHAPE)
    found: list[tuple[nn.Module, tuple[int, ...]]] = []
    modules = [
        m for m in (*encoder.modules(), *decoder.modules()) if isinstance(m, layers.Conv2d | layers.ConvTranspose2d)
    ]
    hooks = [m.register_forward_hook(lambda m, args, out: found.append((m, tuple(args[0].shape)))) for m in modules]
    with torch.no_grad():
        encoder(torch.zeros(batch, *SHAPE))
        decoder(torch.zeros(batch, 8))
    for hook in hooks:
        hook.remove()
    return [(m, shape) for m, shape in found if _chooses(m, shape)]


def _chooses(layer: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether the layer times its forms for this input (it asks ``_products_pay``)."""
    asked: list[bool] = []
    original = layers._products_pay
    layers._products_pay = lambda *args, **kwargs: asked.append(True) or False  # type: ignore[assignment]
    try:
        with torch.no_grad():
            layer(torch.zeros(shape))
    finally:
        layers._products_pay = original
    return bool(asked)


def forced(layer: nn.Module, products: bool) -> Callable[[Tensor], Tensor]:
    """The layer's call with its form fixed."""

    def call(x: Tensor) -> Tensor:
        original = layers._products_pay
        layers._products_pay = lambda *args, **kwargs: products  # type: ignore[assignment]
        try:
            return layer(x)
        finally:
            layers._products_pay = original

    return call


def seconds(call: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor]) -> float:
    start = time.perf_counter()
    out = call(x)
    torch.autograd.grad(out, [x, *params], torch.ones_like(out))
    return time.perf_counter() - start


def picked(layer: nn.Module, x: Tensor) -> bool:
    """The form the layer picks by timing, from a clean slate: True for the products."""
    layers.MEASURED.clear()
    layer(x)
    (choice,) = layers.MEASURED.values()
    return choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per layer and form")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds")
    print(f"{'network':12} {'layer':40} {'dtype':9} {'torch ms':>9} {'products':>9} {'picked':>8}")
    worst = 0.0
    for name, spec, options in NETWORKS:
        for dtype in (torch.float32, torch.bfloat16):
            totals = {"torch": 0.0, "products": 0.0, "picked": 0.0, "best": 0.0, "fixed rule": 0.0}
            for layer, shape in chosen_layers(spec, options, args.batch):
                layer = layer.to(dtype=dtype, memory_format=torch.channels_last)
                x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
                params = list(layer.parameters())
                forms = [forced(layer, False), forced(layer, True)]
                for form in forms:  # warm-up
                    seconds(form, x, params)
                rounds: list[list[float]] = [[], []]
                for _ in range(args.rounds):
                    for times, form in zip(rounds, forms, strict=True):
                        times.append(seconds(form, x, params))
                kernel, products = (statistics.median(t) * 1e3 for t in rounds)
                choice = picked(layer, x)
                fixed = isinstance(layer, nn.ConvTranspose2d) or dtype == torch.bfloat16
                totals["torch"] += kernel
                totals["products"] += products
                totals["picked"] += products if choice else kernel
                totals["best"] += min(kernel, products)
                totals["fixed rule"] += products if fixed else kernel
                (k, _), (stride, _) = layer.kernel_size, layer.stride
                geometry = f"{layer.in_channels}->{layer.out_channels}, {k}x{k}/{stride}, {shape[2]}x{shape[3]}"
                label = f"{type(layer).__name__} {geometry}"
                form = "products" if choice else "torch"
                print(f"{name:12} {label:40} {str(dtype)[6:]:9} {kernel:9.1f} {products:9.1f} {form:>8}", flush=True)
            ratio = totals["picked"] / totals["best"]
            worst = max(worst, ratio)
            print(
                f"{name}, {str(dtype)[6:]}: picked {totals['picked']:.0f} ms, best {totals['best']:.0f} ms "
                f"({ratio:.2f}x); torch's kernels throughout {totals['torch'] / totals['picked']:.2f}x the picked "
                f"time, products throughout {totals['products'] / totals['picked']:.2f}x, the fixed rule "
                f"{totals['fixed rule'] / totals['picked']:.2f}x"
            )
    verdict = "met" if worst <= TARGET else "NOT met"
    print(f"headline: the picked forms take at most {worst:.2f}x the best forms' time (target {TARGET}): {verdict}")


if __name__ == "__main__":
    main()
