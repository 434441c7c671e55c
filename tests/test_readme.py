"""The README and the user documentation as a user meets them: the quick start fits a screen, the Python examples
run, the cheap commands succeed, the error transcript is what the command prints, and the files and subcommands
named exist. Every launch command runs as pasted: no placeholder, a process count the experiment's global batch
splits over, `mkdir -p logs` before `sbatch`. The command line's help has no reStructuredText markup."""

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
from vegan_scale import sweep
from vegan_scale.cli_parser import parser
from vegan_scale.experiment import load_experiment

README = ROOT / "README.md"
LAUNCH_README = ROOT / "launch" / "README.md"
# what a user reads to run things (docs/design.md, performance.md and results.md are notes with their own checks)
PAGES = [
    README,
    LAUNCH_README,
    ROOT / "launch" / "slurm" / "README.md",
    *(ROOT / "docs" / f"{name}.md" for name in ("training", "launching", "data", "resume", "evaluation", "mlflow")),
    ROOT / "docs" / "reference.md",
]
QUICK_START_LINES = 60
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# commands that only read: safe to run from a README on any machine, in seconds
CHEAP = re.compile(r"^(?:\.venv/bin/)?vegan-scale (?:config\b|\S+ --help$)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?<![\w./<$-])((?:configs|launch|docs|bench|tests|tools|vegan_scale)/[\w./-]*\w)")


def blocks(language: str, path: Path | None = None) -> list[str]:
    """The fenced blocks of ``language`` in one page, or in every page. ```python blocks run; ```py blocks are
    templates (a run id to fill in)."""
    return [
        body
        for page in ([path] if path else PAGES)
        for lang, body in FENCE.findall(page.read_text())
        if lang == language
    ]


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
    """Each ```python block, run as a script from the repository root (where the pages' paths point)."""
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
    assert proc.returncode == 0, f"python block {index}:\n{script.read_text()}\n{proc.stderr[-4000:]}"


def test_there_is_a_python_example() -> None:
    assert blocks("python", README), "README.md has no ```python block"


def test_quick_start_fits_a_screen_and_links_the_reference() -> None:
    text = README.read_text()
    quick = text.split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert len(quick.splitlines()) <= QUICK_START_LINES
    for page in PAGES[3:]:
        assert f"(docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


def test_help_is_plain_text() -> None:
    """--help of the program and of every command: no reStructuredText (``code``, :class:`x`) or markdown ticks."""
    commands = ["", *parser()._subparsers._group_actions[0].choices]
    for command in commands:
        proc = subprocess.run(
            [sys.executable, "-m", "vegan_scale", *command.split(), "--help"], capture_output=True, text=True
        )
        assert proc.returncode == 0 and proc.stdout, command
        assert not re.search(r"`|:(class|func|mod|meth):|^\.\. ", proc.stdout, re.MULTILINE), proc.stdout
    version = subprocess.run([sys.executable, "-m", "vegan_scale", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and re.fullmatch(r"vegan-scale \S+\n", version.stdout), version.stdout


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
    named = {c for page in PAGES for c in re.findall(r"vegan-scale ([a-z][a-z-]*[a-z])", page.read_text())}
    assert named, "the pages name no vegan-scale subcommand"
    assert named <= commands, f"the pages name subcommands the CLI lacks: {sorted(named - commands)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(page: Path) -> None:
    named = sorted(set(REPO_PATH.findall(page.read_text())))
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


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

    def variable(name: str) -> str | None:
        return next((w.split("=", 1)[1] for w in words if w.startswith(f"{name}=")), None)

    if any(w.endswith(".sbatch") for w in words):
        per_node = option("--ntasks-per-node") or option("--gpus-per-node") or variable("GPUS_PER_NODE")
        return int(option("--nodes")) * int(per_node)
    return int(variable("NPROC") or 1)


def experiment(words: list[str]) -> tuple[str | None, list[str]]:
    """The config file and the overrides of a training command line."""
    for i, word in enumerate(words):
        if word.endswith(".yaml") and word.startswith("configs/sweeps/"):  # a grid: test_sweep_grids_expand
            return None, []
        if word.endswith(".yaml") and word.startswith("configs/"):
            return word, [w for w in words[i + 1 :] if "=" in w and not w.startswith("-")]
    return None, []


def test_launch_commands_run_as_pasted() -> None:
    """Every training command of the pages: its processes share the experiment's global batch (else exit code 2),
    a launcher states how many processes it starts, and no shell line holds a placeholder (CONFIG, <jobid>)."""
    checked, wrong = 0, []
    for path in PAGES:
        for command in training_commands(path):
            words = shlex.split(command)
            config, overrides = experiment(words)
            if config is None:  # prose naming the form of a command (`launch/run.sh CONFIG [key=value ...]`)
                continue
            n, batch = processes(words), load_experiment(ROOT / config, overrides).train.global_batch_size
            checked += 1
            if batch % n:
                wrong.append(f"{path.name}: {command}  ({n} processes, train.global_batch_size={batch})")
            if "accelerate" in command and "--config_file" not in command and "--num_processes" not in command:
                wrong.append(f"{path.name}: {command}  (how many processes?)")
    assert checked >= 15, f"only {checked} training commands found"
    for path in PAGES:
        for body in blocks("bash", path):
            for line in body.replace("\\\n", " ").splitlines():
                code = line.split("#")[0].replace("PREEMPT", "")  # the stop file's name, not a placeholder
                if re.search(r"<[a-z_ ]+>|(?<![$\w{])\b[A-Z][A-Z_]{2,}\b(?!=)", code) and "make " not in code:
                    wrong.append(f"{path.name}: placeholder in {line.strip()!r}")
    assert not wrong, "commands that do not run as pasted:\n" + "\n".join(wrong)


@pytest.mark.parametrize("grid", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_grids_expand(grid: Path) -> None:
    """The shipped grid files expand into tasks that the schema accepts, with distinct run names."""
    found = sweep.tasks(grid)
    assert found and len({t.run_name for t in found}) == len(found)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_logs_exist_before_sbatch(page: Path) -> None:
    """sbatch writes the job's log to logs/ (the scripts' --output), which must exist when the job starts."""
    text = page.read_text()
    for body in blocks("bash", page):
        lines = body.splitlines()
        for i, line in enumerate(lines):
            if re.search(r"\bsbatch ", line.split("#")[0]):
                assert any("mkdir -p logs" in earlier for earlier in lines[: i + 1]), f"{page.name}: {line}"
    for code in INLINE_CODE.findall(FENCE.sub("", text)):
        if re.search(r"\bsbatch --", code):
            assert code.startswith("mkdir -p logs && "), f"{page.name}: `{code}`"


def test_launch_readme_paths_exist() -> None:
    text = LAUNCH_README.read_text()
    relative = re.findall(r"`((?:accelerate|deepspeed|slurm)/[\w./-]*\w)`", text)  # named from launch/
    named = set(REPO_PATH.findall(text)) | {f"launch/{p}" for p in relative}
    missing = [path for path in sorted(named) if not (ROOT / path).exists()]
    assert not missing, f"launch/README.md names paths that do not exist: {missing}"
