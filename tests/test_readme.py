"""README.md as a user meets it: its Python examples run, its cheap commands succeed, its error transcript is what
the command prints, and the files and subcommands it names exist. Its launch commands, and launch/README.md's,
start a number of processes that the experiment's global batch splits over."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT
from tests.runkit import env
from vegan_scale.cli import parser
from vegan_scale.config.load import load_config
from vegan_scale.registry import ExperimentConfig

README = ROOT / "README.md"
LAUNCH_README = ROOT / "launch" / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# commands that only read: safe to run from a README on any machine, in seconds
CHEAP = re.compile(r"^(?:\.venv/bin/)?vegan-scale (?:config\b|\S+ --help$)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?<![\w./<$-])((?:configs|launch|docs|bench|tests|tools|vegan_scale)/[\w./-]*\w)")


def blocks(language: str, path: Path = README) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def vegan_scale_cli(command: str) -> list[str]:
    """A README command line as this interpreter runs it (``vegan-scale`` is ``python -m vegan_scale``)."""
    words = shlex.split(command)
    assert words[0].endswith("vegan-scale"), command
    return [sys.executable, "-m", "vegan_scale", *words[1:]]


def cheap_commands() -> list[str]:
    lines = [line.split("  #")[0].strip() for body in blocks("bash") for line in body.splitlines()]
    return [line for line in lines if CHEAP.match(line)]


@pytest.mark.data
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs(index: int, mnist_shards: Path, tmp_path: Path) -> None:
    """Each ```python block, run as a script from the repository root (where the README's paths point)."""
    script = tmp_path / f"readme_{index}.py"
    script.write_text(blocks("python")[index])
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**env(), "TMPDIR": str(tmp_path)},  # the example's tempfile directories land in pytest's tmp_path
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"README python block {index}:\n{script.read_text()}\n{proc.stderr[-4000:]}"


def test_there_is_a_python_example() -> None:
    assert blocks("python"), "README.md has no ```python block"


@pytest.mark.parametrize("command", cheap_commands())
def test_cheap_command_succeeds(command: str) -> None:
    proc = subprocess.run(vegan_scale_cli(command), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{command} printed nothing"


def test_cheap_commands_found() -> None:
    commands = cheap_commands()
    assert any("config --describe" in c for c in commands) and any(re.search(r"config \S+\.yaml", c) for c in commands)


def test_error_transcript_is_what_the_command_prints() -> None:
    """The ``$ command`` block: the printed error is exactly the one shown, and the exit code is 2."""
    transcripts = [body for body in blocks("") if body.startswith("$ ")]
    assert transcripts, "README.md has no ``` block starting with '$ '"
    for body in transcripts:
        command, *expected = body.rstrip("\n").splitlines()
        proc = subprocess.run(
            vegan_scale_cli(command[2:]), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.rstrip("\n").splitlines() == expected


def test_named_subcommands_exist() -> None:
    commands = set(parser()._subparsers._group_actions[0].choices)
    named = set(re.findall(r"vegan-scale ([a-z]+)", README.read_text()))
    assert named, "README.md names no vegan-scale subcommand"
    assert named <= commands, f"README.md names subcommands the CLI lacks: {sorted(named - commands)}"


def test_named_repository_paths_exist() -> None:
    named = sorted(set(REPO_PATH.findall(README.read_text())))
    assert len(named) > 10, named
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"README.md names paths that do not exist: {missing}"


def training_commands(path: Path) -> list[str]:
    """Every command line in ``path`` that trains: inline code and bash lines (continuations joined)."""
    text = path.read_text()
    lines = INLINE_CODE.findall(FENCE.sub("", text))
    for body in blocks("bash", path):
        lines += [line.split("  #")[0].strip() for line in body.replace("\\\n", " ").splitlines()]
    return [line for line in lines if re.search(r"(vegan_scale|vegan-scale) train\b|\.sbatch |run\.sh ", line)]


def processes(words: list[str]) -> int:
    """How many training processes a launch command line starts (1 when it names no layout)."""

    def option(name: str) -> str | None:
        for i, word in enumerate(words):
            if word == name:
                return words[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
        return None

    if option("--num_processes"):
        return int(option("--num_processes"))
    if option("--config_file"):
        return yaml.safe_load((ROOT / option("--config_file")).read_text())["num_processes"]
    if any(w.endswith(".sbatch") for w in words):
        return int(option("--nodes")) * int(option("--ntasks-per-node") or option("--gpus-per-node"))
    nproc = [w.split("=", 1)[1] for w in words if w.startswith("NPROC=")]
    return int(nproc[0]) if nproc else 1


def experiment(words: list[str]) -> tuple[str | None, list[str]]:
    """The config file and the overrides of a training command line."""
    for i, word in enumerate(words):
        if word.endswith(".yaml") and word.startswith("configs/"):
            return word, [w for w in words[i + 1 :] if "=" in w and not w.startswith("-")]
    return None, []


@pytest.mark.parametrize("path", [README, LAUNCH_README], ids=["README", "launch/README"])
def test_launch_commands_split_the_global_batch(path: Path) -> None:
    """A command whose processes cannot share the experiment's global batch would stop with exit code 2."""
    checked, wrong = 0, []
    for command in training_commands(path):
        words = shlex.split(command)
        config, overrides = experiment(words)
        if config is None:  # a placeholder (CONFIG)
            continue
        n, batch = processes(words), load_config(ExperimentConfig, ROOT / config, overrides).train.global_batch_size
        checked += 1
        if batch % n:
            wrong.append(f"{command}  ({n} processes, train.global_batch_size={batch})")
    assert checked >= 5, f"{path.name}: only {checked} training commands found"
    assert not wrong, "commands whose global batch does not split over their processes:\n" + "\n".join(wrong)


def test_launch_readme_paths_exist() -> None:
    text = LAUNCH_README.read_text()
    relative = re.findall(r"`((?:accelerate|deepspeed|slurm)/[\w./-]*\w)`", text)  # named from launch/
    named = set(REPO_PATH.findall(text)) | {f"launch/{p}" for p in relative}
    missing = [path for path in sorted(named) if not (ROOT / path).exists()]
    assert not missing, f"launch/README.md names paths that do not exist: {missing}"
