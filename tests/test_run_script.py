"""launch/run.sh with DRY_RUN=1: the command it would run for each setup, and its refusals; the SLURM batch scripts
run without SLURM (no training here)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT

SCRIPT = ROOT / "launch" / "run.sh"
CONFIG = "configs/mnist/wae_mmd.yaml"
# overrides that quoting could break: spaces, brackets, braces, a glob character, a shell variable
OVERRIDES = ["train.max_steps=200", "model.mlp.hidden=[64, 32]", "data.train=/d/x-{000..009}.tar", "run.name=a*b $X"]
SETTINGS = ("NPROC", "MODE", "DEVICE", "MASTER_PORT", "PYTHON", "DRY_RUN")


def run_sh(*args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env |= {"DRY_RUN": "1", **settings}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


def dry_run(*args: str, **settings: str) -> list[str]:
    proc = run_sh(*args, **settings)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def test_one_cpu_process_runs_the_trainer_directly() -> None:
    cmd = dry_run(CONFIG, *OVERRIDES, NPROC="1", MODE="ddp", DEVICE="cpu")
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = str(venv_python) if os.access(venv_python, os.X_OK) else "python3"
    assert cmd == [python, "-m", "vegan_scale", "train", CONFIG, *OVERRIDES]


def test_zero2_on_two_cpu_processes_goes_through_accelerate() -> None:
    cmd = dry_run(CONFIG, *OVERRIDES, NPROC="2", MODE="zero2", DEVICE="cpu", PYTHON="/opt/py")
    assert cmd == [
        "/opt/py",
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch/accelerate/cpu_zero2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "29500",
        "-m",
        "vegan_scale",
        "train",
        CONFIG,
        *OVERRIDES,
    ]


def test_master_port_is_passed() -> None:
    cmd = dry_run(CONFIG, NPROC="2", MODE="ddp", DEVICE="cpu", MASTER_PORT="29876")
    assert cmd[cmd.index("--main_process_port") + 1] == "29876"


@pytest.mark.parametrize(
    ("device", "mode", "file"),
    [
        ("cpu", "ddp", "cpu_ddp.yaml"),
        ("cpu", "zero2", "cpu_zero2.yaml"),
        ("cpu", "zero3", "cpu_zero3.yaml"),
        ("gpu", "ddp", "ddp_1node.yaml"),
        ("gpu", "zero2", "ds_zero2.yaml"),
        ("gpu", "zero3", "ds_zero3.yaml"),
    ],
)
def test_each_setup_names_an_existing_launch_file(device: str, mode: str, file: str) -> None:
    cmd = dry_run(CONFIG, NPROC="4", MODE=mode, DEVICE=device)
    launch_file = Path(cmd[cmd.index("--config_file") + 1])
    assert launch_file == ROOT / "launch/accelerate" / file
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    ds_json = (yaml.safe_load(launch_file.read_text()).get("deepspeed_config") or {}).get("deepspeed_config_file")
    assert (ds_json is not None) == (mode != "ddp"), f"{file}: DeepSpeed config file {ds_json!r} for MODE={mode}"
    if ds_json:
        assert (ROOT / ds_json).is_file(), f"{file} names {ds_json}, which does not exist"


def test_every_launch_file_in_the_script_exists() -> None:
    named = re.findall(r"file=(\S+\.yaml)", SCRIPT.read_text())
    assert len(named) == 6, named
    missing = [f for f in named if not (ROOT / "launch/accelerate" / f).is_file()]
    assert not missing, f"launch/run.sh names launch files that do not exist: {missing}"


def test_bad_mode_is_a_usage_error() -> None:
    proc = run_sh(CONFIG, MODE="fsdp", DEVICE="cpu")
    assert proc.returncode == 2
    assert "MODE=fsdp" in proc.stderr and "ddp, zero2 or zero3" in proc.stderr and "usage:" in proc.stderr
    assert not proc.stdout


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        ((CONFIG,), {"NPROC": "0"}, "NPROC=0"),
        ((), {}, "usage:"),
        ((CONFIG,), {"MASTER_PORT": "99999"}, "MASTER_PORT=99999: a port number from 1 to 65535"),  # was a traceback
        ((CONFIG,), {"MASTER_PORT": "x"}, "MASTER_PORT=x"),
    ],
)
def test_other_usage_errors(args: tuple[str, ...], settings: dict[str, str], message: str) -> None:
    proc = run_sh(*args, DEVICE="cpu", **settings)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ["train.sbatch", "train_srun_native.sbatch"])  # sweep.sbatch: its usage line
def test_a_batch_script_run_without_slurm_says_how_to_submit_it(script: str) -> None:
    """`bash launch/slurm/train.sbatch CONFIG` outside a job ended on "SLURM_SUBMIT_DIR: unbound variable": it says
    to submit it with sbatch, and what runs without SLURM, before anything starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VEGAN_SCALE_ROOT"))}
    done = subprocess.run(
        ["bash", f"launch/slurm/{script}", CONFIG], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "submit this script with sbatch" in done.stderr, done.stderr
    assert "without SLURM" in done.stderr and "unbound variable" not in done.stderr
