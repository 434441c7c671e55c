"""Per-process memory of a 171M-parameter WAE under DDP, ZeRO-2 and ZeRO-3 (2 CPU processes, bf16), in one run.

    .venv/bin/python bench/zero_memory.py        # about 4 minutes on 2 cores

For each mode the script launches `accelerate launch --config_file launch/accelerate/cpu_<mode>.yaml` on itself
(worker side), which builds configs/celeba64/wae_mmd_resnet.yaml (the residual network at width 128: 171M
parameters) exactly as training does, takes two optimizer steps of WAE-MMD on random 64x64 images and measures:

* tensor bytes: the sizes of all distinct tensor storages alive in the process between the second step's backward
  pass and its optimizer step (when gradients, parameters and optimizer state all exist), less those alive before
  the model was built: parameters, gradients and optimizer state, including DeepSpeed's flat buffers and fp32
  master copies. DDP's gradient buckets, held by C++ only (another 4 bytes per parameter), are not seen, which
  flatters DDP;
* after build: the same, right after the model is constructed (inside ZeRO-3's partitioned init);
* peak RSS: the process's maximum resident memory.

The last line is the ZeRO-3 to DDP ratio of tensor bytes (target: at most 0.6).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from vegan_scale.process_exit import leave

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/celeba64/wae_mmd_resnet.yaml"
MODES = {"DDP": "cpu_ddp.yaml", "ZeRO-2": "cpu_zero2.yaml", "ZeRO-3": "cpu_zero3.yaml"}


def tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can reach."""
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except Exception:  # some objects refuse inspection; they are not tensors we own
            continue
    return sum(seen.values())


def worker(out: Path) -> None:
    from functools import partial

    import torch

    from vegan_scale.costs import reconstruction_cost
    from vegan_scale.distributed import deepspeed_support, trainable
    from vegan_scale.distributed.accelerator import BatchLayout, apply_layout, build_accelerator
    from vegan_scale.engine.objective import pot_objective
    from vegan_scale.experiment import load_experiment
    from vegan_scale.registry import build_model, build_penalty, build_prior

    cfg = load_experiment(CONFIG, ["train.global_batch_size=4"])
    acc = build_accelerator(cfg.train.mixed_precision)
    layout = BatchLayout.derive(4, acc.num_processes, None)
    apply_layout(acc, layout, cfg.train.mixed_precision)
    gc.collect()
    baseline = tensor_bytes()
    context = deepspeed_support.init_context(acc.state.deepspeed_plugin) if acc.state.deepspeed_plugins else None
    torch.manual_seed(0)
    if context is None:
        model = build_model(cfg)
    else:
        with context:
            model = build_model(cfg)
    gc.collect()
    after_build = tensor_bytes() - baseline
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    ae = trainable.prepare(acc, "autoencoder", model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    penalty, prior = build_penalty(cfg), build_prior(cfg)
    held = 0
    for _ in range(2):
        x = torch.rand(layout.micro, 3, 64, 64).to(ae.input_dtype)
        with acc.accumulate(ae.module), acc.autocast():
            terms = pot_objective(ae.module, prior, partial(reconstruction_cost, kind="l2sq"), penalty, 100.0, x)
            ae.backward(terms.loss)
            del terms
            grads = [p.grad for p in ae.raw.parameters()]  # give C++-held gradients a Python handle the count can see
            gc.collect()
            held = tensor_bytes() - baseline - x.untyped_storage().nbytes()  # gradients exist: the peak of the step
            del grads
            ae.step(1e-4)
    result = {
        "rank": acc.process_index,
        "parameters": params,
        "tensor_bytes": held,
        "after_build": after_build,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out.with_name(f"{out.stem}_rank{acc.process_index}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        leave(0)  # not through the interpreter's teardown while gloo's threads may still release tensors
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ROOT / ".data" / "torch_extensions")}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, config in MODES.items():
            out = Path(tmp) / mode.replace("-", "")
            cmd = [
                accelerate,
                "launch",
                "--config_file",
                str(ROOT / "launch/accelerate" / config),
                __file__,
                "--worker",
                str(out),
            ]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            rows[mode] = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob(f"{out.name}_rank*.json"))]
    gib = 2**30
    print(f"{'mode':<8} {'rank':>4} {'params':>8} {'tensor GiB':>10} {'after build':>11} {'peak RSS GiB':>12}")
    for mode, ranks in rows.items():
        for r in ranks:
            print(
                f"{mode:<8} {r['rank']:>4} {r['parameters'] / 1e6:>7.0f}M {r['tensor_bytes'] / gib:>10.2f} "
                f"{r['after_build'] / gib:>11.2f} {r['peak_rss'] / gib:>12.2f}"
            )

    def mean_bytes(mode: str) -> float:
        return sum(r["tensor_bytes"] for r in rows[mode]) / len(rows[mode])

    print(f"ratio ZeRO-2 / DDP tensor bytes per process: {mean_bytes('ZeRO-2') / mean_bytes('DDP'):.2f}")
    print(f"headline: ZeRO-3 / DDP tensor bytes per process: {mean_bytes('ZeRO-3') / mean_bytes('DDP'):.2f}")


if __name__ == "__main__":
    main()
