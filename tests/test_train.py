"""End-to-end training on real MNIST and a few steps of every recipe."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.paths import ROOT
from tests.runkit import local_mlflow, same_weights, train_args
from vegan_scale.engine.loop import train
from vegan_scale.errors import ConfigError
from vegan_scale.experiment import load_experiment

SMALL = ["model.conv.width=4", "eval.num_samples=200", "eval.grid_size=4", "data.num_workers=0"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_mnist_run_learns_and_is_tracked(mnist_shards: Path, tmp_path: Path) -> None:
    """`vegan-scale train` on real MNIST lowers the reconstruction error and leaves a complete MLflow run."""
    root = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "vegan_scale",
        "train",
        str(ROOT / "configs/mnist/wae_mmd.yaml"),
        f"data.train={mnist_shards / 'train'}",
        f"data.test={mnist_shards / 'test'}",
        f"run.root={root}",
        "run.name=e2e",
        "train.max_steps=120",
        "model.conv.width=8",
        "eval.every_steps=40",
        "tracking.log_every=20",
        "checkpoint.every_steps=60",
        "eval.num_samples=500",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / "mnist" / "e2e"
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    metrics = _metrics(run_dir)
    train_recon = [m["train/recon"] for m in metrics if "train/recon" in m]
    eval_recon = [m["eval/recon"] for m in metrics if "eval/recon" in m]
    assert len(train_recon) == 6 and len(eval_recon) == 3
    assert all(m["perf/eval_s"] > 0 for m in metrics if "eval/recon" in m)  # what the stop lead adds for it
    assert train_recon[-1] < 0.6 * train_recon[0]
    assert eval_recon[-1] < eval_recon[0]
    assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000060", "step_00000120"]
    assert (run_dir / "config.yaml").read_text().startswith("schema_version: 1")

    client, run_id = local_mlflow(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["penalty.kind"] == "mmd" and run.data.params["optim.lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "train/recon")
    assert [m.step for m in history] == [20, 40, 60, 80, 100, 120]
    assert [m.value for m in history] == pytest.approx(train_recon)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in p and p.endswith(".png") for p in images)
    assert any("reconstructions" in p and p.endswith(".png") for p in images)

    # log lines carry time, level and rank, on the console and in the run directory's train.log
    line = re.compile(r"^\d\d:\d\d:\d\d \| INFO \| rank 0 \| step 20/120: loss ")
    assert any(line.match(text) for text in proc.stdout.splitlines()), proc.stdout[-2000:]
    logged = (run_dir / "train.log").read_text().splitlines()
    assert any(re.search(r" \| INFO \| rank 0 \| step 120/120: loss [0-9.]+, recon ", text) for text in logged)


def test_quiet_console_keeps_the_log_file(tiny_shards: Path, tmp_path: Path) -> None:
    """`train --quiet` prints no progress lines; train.log in the run directory still has them all. A healthy CPU
    run has nothing to warn about, DeepSpeed's guess at the accelerator included (it warned on every CPU run).
    Nor does a run without DeepSpeed import it (1.2 s of each process's start; Python's import log says)."""
    args = train_args(tiny_shards, tmp_path, "quiet", "wae_mmd", "train.max_steps=4", "tracking.backend=mlflow")
    args.insert(args.index("train") + 1, "--quiet")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = re.findall(r"^import time:.*\| +(\S+)$", proc.stderr, re.MULTILINE)
    assert "torch" in imported and "deepspeed" not in imported
    console = "\n".join(
        line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("import time:")
    )
    assert "| INFO |" not in console
    assert "WARNING" not in console, console
    log = (tmp_path / "mnist" / "quiet" / "train.log").read_text()
    assert "| INFO | rank 0 | step 4/4: loss " in log


@pytest.mark.parametrize("recipe", ["wae_mmd", "wae_gan", "aae", "vae", "swae"])
def test_every_recipe_trains(recipe: str, tiny_shards: Path, tmp_path: Path) -> None:
    """Each committed recipe runs a few steps on tiny shards and finishes with finite losses."""
    cfg = load_experiment(
        ROOT / f"configs/mnist/{recipe}.yaml",
        [
            *SMALL,
            f"data.train={tiny_shards / 'train'}",
            f"data.test={tiny_shards / 'test'}",
            f"run.root={tmp_path}",
            "run.name=r",
            "train.max_steps=6",
            "train.global_batch_size=20",
            "tracking.backend=none",
            "tracking.log_every=3",
            "eval.every_steps=6",
            "checkpoint.every_steps=0",
        ],
    )
    run_dir = train(cfg)
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics if "train/loss" in m] == [3, 6]
    assert all(v == v and abs(v) < 1e6 for m in metrics for k, v in m.items() if k.startswith("train/"))
    if recipe in ("wae_gan", "aae"):
        assert "train/critic_loss" in metrics[0]
    figures = sorted(p.name.rsplit("_", 1)[0] for p in (run_dir / "figures").glob("*.png"))
    assert figures == ["interpolations", "reconstructions", "samples"]


def test_a_network_larger_than_memory_is_refused_naming_its_settings(tiny_shards: Path, tmp_path: Path) -> None:
    """A 784-10**11-784 MLP with 8 latent dimensions: 2 * (784e11 + 1e11 + 8e11) weights and biases plus 792
    more, 577 TiB in float32 (158.6e12 * 4 bytes), more than any machine holds. Counted on the meta device, it is
    refused naming the network's settings before anything is allocated (torch's own error named only the bytes)."""
    cfg = load_experiment(
        ROOT / "configs/mnist/wae_mmd.yaml",
        [
            f"data.train={tiny_shards / 'train'}",
            f"data.test={tiny_shards / 'test'}",
            f"run.root={tmp_path}",
            "model.network=mlp",
            "model.mlp.hidden=[100000000000]",
            "tracking.backend=none",
        ],
    )
    with pytest.raises(ConfigError, match=r"158,600,000,000,792 parameters: 590,831\.0 GiB .*reduce model\.mlp"):
        train(cfg)


def test_an_mmd_estimate_of_one_code_is_refused_before_the_run_starts(tiny_shards: Path, tmp_path: Path) -> None:
    """A micro-batch of one sample (local MMD) passed every check, made the run directory and ended at the first
    step in a traceback ("the unbiased MMD estimate needs at least 2 samples"). It is refused as the batch is
    shared, before the run directory exists. A global MMD over processes counts their codes together."""
    cfg = load_experiment(
        ROOT / "configs/mnist/wae_mmd.yaml",
        [
            f"data.train={tiny_shards / 'train'}",
            f"data.test={tiny_shards / 'test'}",
            f"run.root={tmp_path / 'runs'}",
            "model.network=mlp",
            "model.mlp.hidden=[16]",
            "train.global_batch_size=20",
            "train.micro_batch_size=1",
            "penalty.mmd.scope=local",
            "tracking.backend=none",
        ],
    )
    words = r"needs at least 2 codes per estimate \(penalty\.mmd\.scope=local: a process's micro-batch\), not 1"
    with pytest.raises(ConfigError, match=words + r": raise .* or train\.micro_batch_size \(now 1\)"):
        train(cfg)
    assert not (tmp_path / "runs").exists()
    assert cfg.penalty.mmd.too_few(1, 1) and not cfg.penalty.mmd.too_few(2, 1)
    assert dataclasses.replace(cfg.penalty.mmd, scope="global").too_few(1, 2) is None  # two codes over two processes


def test_a_critic_larger_than_memory_is_refused_naming_its_settings(tiny_shards: Path, tmp_path: Path) -> None:
    """The WAE-GAN critic counts too (it was built without a check, and torch asked for 400 TB): a 784-16-8 MLP
    pair (12,560 + 136 + 144 + 13,328 = 26,168 parameters) with an 8-10**6-10**6-1 critic (8e6 + 1e6 + 1e12 + 1e6
    + 1e6 + 1) is refused naming both networks' settings."""
    cfg = load_experiment(
        ROOT / "configs/mnist/wae_gan.yaml",
        [
            f"data.train={tiny_shards / 'train'}",
            f"data.test={tiny_shards / 'test'}",
            f"run.root={tmp_path}",
            "model.network=mlp",
            "model.mlp.hidden=[16]",
            "penalty.adversarial.hidden=1000000",
            "penalty.adversarial.layers=2",
            "tracking.backend=none",
        ],
    )
    count = 26_168 + 8 * 10**6 + 10**6 + 10**12 + 10**6 + 10**6 + 1
    with pytest.raises(ConfigError, match=f"{count:,} parameters with the critic: .*penalty\\.adversarial"):
        train(cfg)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision: str, tiny_shards: Path, tmp_path: Path) -> None:
    """bf16 autocast and fp16 with a gradient scaler run a few WAE-MMD steps to finite losses."""
    cfg = load_experiment(
        ROOT / "configs/mnist/wae_mmd.yaml",
        [
            *SMALL,
            f"data.train={tiny_shards / 'train'}",
            f"data.test={tiny_shards / 'test'}",
            f"run.root={tmp_path}",
            "run.name=mp",
            "train.max_steps=4",
            "train.global_batch_size=20",
            "tracking.backend=none",
            "tracking.log_every=2",
            "eval.every_steps=4",
            "checkpoint.every_steps=0",
            f"train.mixed_precision={precision}",
        ],
    )
    metrics = _metrics(train(cfg))
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 2 and all(abs(v) < 1e6 for v in losses)


def test_bf16_weights_copy_trains_like_float32_and_continues_exactly(tiny_shards: Path, tmp_path: Path) -> None:
    """train.low_precision_weights (bf16 compute, float32 masters and optimizer) follows float32 training: from the
    same seed over 60 WAE-MMD steps, the mean of the six logged 10-step mean losses within 3% of the float32 run's,
    and each of them within 10% (bf16 keeps 8 bits, so single steps differ by about 1% and the two runs drift apart
    as chaotic trajectories do; measured over seeds 0-9: the mean within 0.1-2.3%, the farthest 10-step mean
    1.8-7.3%); the checkpoint holds float32 weights and moments; and a run stopped at step 30 and continued ends
    with the uninterrupted run's weights bit for bit (the copy is rebuilt from the loaded masters)."""
    copy = ["train.mixed_precision=bf16", "train.low_precision_weights=true"]

    def run(name: str, steps: int, precision: list[str]) -> Path:
        overrides = [*SMALL, f"data.train={tiny_shards / 'train'}", f"data.test={tiny_shards / 'test'}"]
        overrides += [
            f"run.root={tmp_path}",
            f"run.name={name}",
            f"train.max_steps={steps}",
            "train.global_batch_size=20",
        ]
        overrides += [
            "tracking.backend=none",
            "tracking.log_every=10",
            "eval.every_steps=60",
            "checkpoint.every_steps=30",
            "train.deterministic=true",  # each convolution's form by rule: bit-exact continuation, as documented
        ]
        return train(load_experiment(ROOT / "configs/mnist/wae_mmd.yaml", [*overrides, *precision]))

    reference, whole = run("float32", 60, []), run("copy", 60, copy)
    run("continued", 30, copy)
    continued = run("continued", 60, [*copy, "train.resume=auto"])
    losses = {
        name: [m["train/loss"] for m in _metrics(d) if "train/loss" in m]
        for name, d in (("float32", reference), ("copy", whole))
    }
    assert len(losses["copy"]) == 6 and losses["copy"][-1] < 0.6 * losses["copy"][0]
    ours, theirs = sum(losses["copy"]), sum(losses["float32"])
    assert abs(ours - theirs) <= 0.03 * abs(theirs), losses
    for ours, theirs in zip(losses["copy"], losses["float32"], strict=True):
        assert abs(ours - theirs) <= 0.10 * abs(theirs), losses
    for file in (whole / "checkpoints" / "step_00000060").glob("autoencoder*.safetensors"):
        assert {v.dtype for v in load_file(file).values()} <= {torch.float32, torch.int64}, file
    assert same_weights(continued / "export" / "model.safetensors", whole / "export" / "model.safetensors")


def _tiny_mlp(shards: Path, root: Path, *extra: str) -> list[str]:
    """Overrides of a run "r" of a 784-16-8 MLP pair on tiny shards, untracked, without periodic evaluation."""
    return [
        *SMALL,
        f"data.train={shards / 'train'}",
        f"data.test={shards / 'test'}",
        f"run.root={root}",
        "run.name=r",
        "model.network=mlp",
        "model.mlp.hidden=[16]",
        "train.global_batch_size=20",
        "tracking.backend=none",
        "eval.every_steps=1000",
        *extra,
    ]


def test_a_run_continued_without_a_checkpoint_says_it_starts_again(tiny_shards: Path, tmp_path: Path) -> None:
    """A run directory whose run wrote no checkpoint (checkpoint.every_steps=0, or stopped before its first) was
    trained again from step 1 without a word, its metrics and export replaced. It still starts again (there is
    nothing to continue from), and its log says so."""
    args = _tiny_mlp(tiny_shards, tmp_path, "tracking.log_every=1", "checkpoint.every_steps=0")
    run_dir = train(load_experiment(ROOT / "configs/mnist/wae_mmd.yaml", [*args, "train.max_steps=2"]))
    assert "no checkpoint to continue from" not in (run_dir / "train.log").read_text()
    train(load_experiment(ROOT / "configs/mnist/wae_mmd.yaml", [*args, "train.max_steps=3"]))
    assert f"{run_dir} holds a run but no checkpoint to continue from" in (run_dir / "train.log").read_text()
    assert [m["step"] for m in _metrics(run_dir) if "train/loss" in m] == [1, 2, 3]


def test_a_run_continued_past_its_end_says_nothing_is_trained(tiny_shards: Path, tmp_path: Path) -> None:
    """A run at step 3 continued with train.max_steps=2 ended "finished" without a word; it still ends (the export
    holds step 3), and its log says so."""
    args = _tiny_mlp(tiny_shards, tmp_path, "checkpoint.every_steps=3")
    run_dir = train(load_experiment(ROOT / "configs/mnist/wae_mmd.yaml", [*args, "train.max_steps=3"]))
    train(load_experiment(ROOT / "configs/mnist/wae_mmd.yaml", [*args, "train.max_steps=2"]))
    said = (run_dir / "train.log").read_text()
    assert "the run is at step 3, past its end at step 2" in said and "the export holds step 3" in said, said[-2000:]
