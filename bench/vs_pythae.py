"""Training throughput of vegan_scale against pythae's WAE_MMD trainer, same networks, same in-memory images.

    make bench-env                          # once: .venv-pythae with pythae 0.1.2 beside the same torch
    .venv/bin/python bench/vs_pythae.py     # about 10 minutes on 2 cores

Both sides train WAE-MMD (latent 8, multi-scale IMQ kernel, lambda 10, Adam 1e-3, batch 100) on the first 2,000
MNIST training images held in memory, on pythae's MNIST benchmark pair (`model.network=pythae_conv`, 17M
parameters) and its default MLP pair (`mlp`, hidden 512, 0.8M parameters). pythae runs its own `BaseTrainer`
(timed per epoch by a callback, the first epoch left out as warm-up); vegan_scale runs its training step
(`vegan_scale.engine.step.train_step`, the code `vegan-scale train` runs) on batches taken from the same tensor.
The two alternate, one process at a time, and each figure is the best of two runs. vegan_scale is measured at
several settings, three of them with one optimisation undone (unfused AdamW; torch's own convolution kernels
instead of vegan_scale.models.layers', in float32 and bf16) to show its effect; the ratios compare the MLP at
float32, the conv pair at float32, and the conv pair at each tool's best CPU setting (pythae has no CPU mixed
precision). The last line is the smallest ratio against its target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHAE_PYTHON = ROOT / ".venv-pythae" / "bin" / "python"
ARCHS = {"mlp": ("mlp", 60), "conv": ("pythae_conv", 6)}  # vegan_scale network name, timed steps
PLAIN_CONV = "bench.plain_conv"  # not a config key: the worker computes every convolution with torch's kernels
BF16_COPY = ["train.mixed_precision=bf16", "train.low_precision_weights=true"]
SETTINGS = {  # label -> overrides
    "float32, unfused AdamW": ["optim.fused=false"],
    "float32, torch's convolutions": [PLAIN_CONV],
    "float32": [],
    "float32, torch.compile": ["train.compile=true"],
    "float32, channels-last": ["train.channels_last=true"],
    "bf16": ["train.mixed_precision=bf16"],
    "bf16, channels-last": ["train.mixed_precision=bf16", "train.channels_last=true"],
    "bf16, weights copy": [*BF16_COPY],
    "bf16, weights copy, torch's convolutions": [*BF16_COPY, PLAIN_CONV],
}


def pythae_worker(arch: str, images: Path, epochs: int) -> float:
    import numpy as np
    import torch
    from pythae.data.datasets import BaseDataset
    from pythae.models import WAE_MMD, WAE_MMD_Config
    from pythae.models.nn.benchmarks.mnist import Decoder_Conv_AE_MNIST, Encoder_Conv_AE_MNIST
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    data = torch.from_numpy(np.load(images)).float().div(255)
    config = WAE_MMD_Config(
        input_dim=(1, 28, 28), latent_dim=8, kernel_choice="imq", reg_weight=10.0, reconstruction_loss_scale=0.05
    )
    nets = (
        {"encoder": Encoder_Conv_AE_MNIST(config), "decoder": Decoder_Conv_AE_MNIST(config)} if arch == "conv" else {}
    )
    model = WAE_MMD(config, **nets)

    class EpochTimer(TrainingCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_epoch_begin(self, training_config: object, **kwargs: object) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, training_config: object, **kwargs: object) -> None:
            self.times.append(time.perf_counter() - self.start)

    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer_config = BaseTrainerConfig(
            output_dir=out,
            per_device_train_batch_size=100,
            num_epochs=epochs,
            learning_rate=1e-3,
            optimizer_params={"betas": (0.5, 0.999)},
            steps_saving=None,
            no_cuda=True,
        )
        BaseTrainer(
            model, BaseDataset(data, torch.zeros(len(data))), training_config=trainer_config, callbacks=[timer]
        ).train()
    return len(data) * (epochs - 1) / sum(timer.times[1:])


def vegan_worker(arch: str, images: Path, steps: int, overrides: list[str]) -> float:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from step_under_test import training_step  # vegan_scale is not installed where pythae runs

    if PLAIN_CONV in overrides:  # the step without vegan_scale.models.layers, for its measured effect
        from torch import nn

        from vegan_scale.models import layers

        layers.Conv2d.forward = nn.Conv2d.forward
        layers.ConvTranspose2d.forward = nn.ConvTranspose2d.forward
        overrides = [o for o in overrides if o != PLAIN_CONV]
    step = training_step(ARCHS[arch][0], overrides, images)
    for _ in range(max(3, steps // 10)):  # warm-up (and compilation, when asked for)
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.as_tensor(loss).item()
    return steps * 100 / (time.perf_counter() - start)


def _measure(cmd: list[str]) -> float:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        side, arch, images = args.worker[:3]
        rate = (
            pythae_worker(arch, Path(images), 3 if arch == "conv" else 4)
            if side == "pythae"
            else vegan_worker(arch, Path(images), ARCHS[arch][1], args.worker[3:])
        )
        print(json.dumps({"samples_per_sec": rate}))
        return
    if not PYTHAE_PYTHON.exists():
        sys.exit(f"{PYTHAE_PYTHON} not found: run `make bench-env` first (pythae 0.1.2 in its own environment)")
    import numpy as np

    from vegan_scale.data.images import load_images
    from vegan_scale.data.index import read_index

    best: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.npy"
        index = read_index(str(ROOT / ".data/shards/mnist/train"))
        np.save(images, load_images(index, (1, 28, 28), 2000)[0].numpy())
        for _ in range(args.repeats):
            for arch in ARCHS:
                runs = {
                    "pythae (its trainer, float32)": [
                        str(PYTHAE_PYTHON),
                        __file__,
                        "--worker",
                        "pythae",
                        arch,
                        str(images),
                    ]
                }
                for label, overrides in SETTINGS.items():
                    runs[f"vegan_scale, {label}"] = [
                        sys.executable,
                        __file__,
                        "--worker",
                        "vegan",
                        arch,
                        str(images),
                        *overrides,
                    ]
                for label, cmd in runs.items():
                    best[arch, label] = max(best.get((arch, label), 0.0), _measure(cmd))
    print(f"{'network':<6} {'trainer and setting':<52} {'samples/s':>10}")
    for (arch, label), rate in best.items():
        print(f"{arch:<6} {label:<52} {rate:>10.0f}")
    pythae = {arch: best[arch, "pythae (its trainer, float32)"] for arch in ARCHS}
    fastest = max((r, label) for (a, label), r in best.items() if a == "conv" and label.startswith("vegan"))
    ratios = [
        ("MLP, float32 (target 1.5)", best["mlp", "vegan_scale, float32"] / pythae["mlp"], 1.5),
        ("conv pair, float32 (target 1.0)", best["conv", "vegan_scale, float32"] / pythae["conv"], 1.0),
        (f"conv pair, best setting: {fastest[1]} (target 1.5)", fastest[0] / pythae["conv"], 1.5),
    ]
    for what, ratio, _ in ratios:
        print(f"ratio vegan_scale / pythae, {what}: {ratio:.2f}x")
    what, ratio, _ = min(ratios, key=lambda r: r[1] / r[2])
    print(f"headline: vegan_scale runs {ratio:.2f}x pythae ({what}), the closest to its target")
    from vegan_scale.distributed.accelerator import bf16_emulated

    if bf16_emulated(cuda=False):  # the best-setting target was set where bf16 runs natively
        print("note: this CPU has no bf16 instructions (AVX-512 BF16 or AMX): the best setting is float32 for both")


if __name__ == "__main__":
    main()
