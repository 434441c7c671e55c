"""launch/run.sh with DRY_RUN=1: the command it would run for each setup, and its refusals; the SLURM batch scripts
run without SLURM (no training here)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT
from tests.runkit import train_args

SCRIPT = ROOT / "launch" / "run.sh"
CONFIG = "configs/mnist/wae_mmd.yaml"
# overrides that quoting could break: spaces, brackets, braces, a glob character, a shell variable
OVERRIDES = ["train.max_steps=200", "model.mlp.hidden=[64, 32]", "data.train=/d/x-{000..009}.tar", "run.name=a*b $X"]
SETTINGS = ("NPROC", "MODE", "DEVICE", "MASTER_PORT", "PYTHON", "DRY_RUN", "ALLOCATOR", "LD_PRELOAD")
TCMALLOC = "libtcmalloc_minimal.so.4"


def run_sh(*args: str, **settings: str) -> subprocess.CompletedProcess:
    """launch/run.sh ARGS; a dry run with the system's malloc unless ``settings`` say otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env |= {"DRY_RUN": "1", "ALLOCATOR": "system", **settings}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def installed_tcmalloc() -> str | None:
    """The path ldconfig knows for tcmalloc (an independent lookup: the library files on the loader's paths)."""
    for directory in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib64"):
        if (Path(directory) / TCMALLOC).exists():
            return str(Path(directory) / TCMALLOC)
    return None


needs_tcmalloc = pytest.mark.skipif(
    installed_tcmalloc() is None, reason=f"{TCMALLOC} is not installed (.ci/run installs libtcmalloc-minimal4)"
)


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


def test_cpu_runs_under_tcmalloc_where_it_is_installed() -> None:
    """On CPU, glibc's malloc maps and unmaps every tensor of 32 MB or more at each step (7,000-32,000 page faults
    a step on pythae's conv pair, bench/allocator.py): the default preloads tcmalloc where it is installed, and
    says nothing otherwise; a GPU launch, ALLOCATOR=system and a set LD_PRELOAD are left alone."""
    cmd = dry_run(CONFIG, DEVICE="cpu", ALLOCATOR=None)
    library = installed_tcmalloc()
    if library is None:
        assert cmd[0] != "env"
    else:
        assert cmd[:2] == ["env", f"LD_PRELOAD={library}"] and cmd[3:6] == ["-m", "vegan_scale", "train"]
    assert dry_run(CONFIG, DEVICE="gpu", NPROC="1", ALLOCATOR=None)[0] != "env"
    assert dry_run(CONFIG, DEVICE="cpu", ALLOCATOR="system")[0] != "env"
    assert dry_run(CONFIG, DEVICE="cpu", ALLOCATOR="tcmalloc", LD_PRELOAD="/opt/mine.so")[0] != "env"


def test_an_allocator_that_cannot_be_had_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_sh(CONFIG, DEVICE="cpu", ALLOCATOR="jemalloc")
    assert proc.returncode == 2 and "ALLOCATOR=jemalloc: tcmalloc or system" in proc.stderr, proc.stderr
    bare = tmp_path / "bin"  # a PATH whose ldconfig knows no library: tcmalloc asked for by name is refused
    bare.mkdir()
    (bare / "ldconfig").write_text("#!/bin/sh\nexit 0\n")
    (bare / "ldconfig").chmod(0o755)
    path = f"{bare}:{os.environ['PATH']}"
    proc = run_sh(CONFIG, DEVICE="cpu", ALLOCATOR="tcmalloc", PATH=path)
    assert proc.returncode == 2 and f"{TCMALLOC} is not installed" in proc.stderr and "ALLOCATOR=system" in proc.stderr
    assert dry_run(CONFIG, DEVICE="cpu", ALLOCATOR=None, PATH=path)[0] != "env"  # the default falls back quietly


def _listing_that_goes_on(directory: Path, name: str, first: str) -> str:
    """A PATH whose ``name`` prints ``first``, then, after a pause, a thousand more lines: a reader that quits after
    the first line kills it by SIGPIPE at its next write (a long ldconfig cache or node list does this by chance)."""
    directory.mkdir()
    more = 'i=0; while [ $i -lt 1000 ]; do echo "line $i"; i=$((i + 1)); done'
    (directory / name).write_text(f"#!/bin/sh\necho '{first}'\nsleep 0.3\n{more}\n")
    (directory / name).chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


def test_the_library_list_is_read_to_its_end(tmp_path: Path) -> None:
    """run.sh runs under pipefail: had it stopped reading ldconfig's list at tcmalloc's line, ldconfig would die of
    SIGPIPE and the launcher with it, silently (exit 141), as it once did in CI."""
    path = _listing_that_goes_on(tmp_path / "bin", "ldconfig", f"\t{TCMALLOC} (libc6,x86-64) => /opt/t/{TCMALLOC}")
    cmd = dry_run(CONFIG, DEVICE="cpu", ALLOCATOR=None, PATH=path)
    assert cmd[:2] == ["env", f"LD_PRELOAD=/opt/t/{TCMALLOC}"]


def test_the_batch_scripts_read_the_node_list_to_its_end(tmp_path: Path) -> None:
    """The SLURM scripts' head node is the first of ``scontrol show hostnames``, read whole under pipefail."""
    path = _listing_that_goes_on(tmp_path / "bin", "scontrol", "node-a")
    lib = ROOT / "launch" / "slurm" / "lib.sh"
    script = f"set -euo pipefail; source {shlex.quote(str(lib))}; head_node"
    env = {**os.environ, "PATH": path, "SLURM_JOB_NODELIST": "node-[a-z]"}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "node-a\n"), done.stderr


@needs_tcmalloc
def test_training_runs_with_tcmalloc_preloaded(tiny_shards: Path, tmp_path: Path) -> None:
    """A real run through launch/run.sh on CPU: the trainer's process has tcmalloc mapped, and it trains."""
    wrapper = tmp_path / "python"  # what run.sh starts as the interpreter: records the libraries it runs with
    maps = tmp_path / "maps"
    wrapper.write_text(f'#!/bin/sh\ngrep -c tcmalloc /proc/$$/maps > {maps}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    args = train_args(tiny_shards, tmp_path / "runs", "tc", "wae_mmd", "train.max_steps=4", "checkpoint.every_steps=4")
    done = run_sh(*args[3:], DEVICE="cpu", ALLOCATOR=None, DRY_RUN=None, PYTHON=str(wrapper))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tcmalloc preloaded" in done.stderr and int(maps.read_text()) > 0
    assert (tmp_path / "runs" / "mnist" / "tc" / "checkpoints" / "step_00000004").is_dir()  # experiment / run
