"""YAML files read as plain data, safe against files that stand for far more than they hold.

A YAML alias (``*name``) repeats an anchored value without copying it, so nested aliases let a file of a few
hundred bytes stand for billions of values (the "billion laughs"), and an alias inside its own anchor makes a value
that contains itself. Every walk over such data (validation, OmegaConf, the comparison of a continuation's
settings) hangs, runs out of memory or recurses without end. Configuration files, grid files, checkpoints'
config.yaml and exports' model.yaml come from other people and from shared storage, so each is measured before it
is built: aliases are allowed while the data they stand for stay small. A file that is not YAML at all (a shard or
a checkpoint named by mistake) is refused by its size or its bytes, not read whole or decoded in Python, and one
that is not a regular file (a device, a pipe) before anything is read.

YAML 1.1 reads plain scalars by their look: ``010`` is the number 8, ``0x10`` 16, ``1_000`` 1000, ``no`` false,
``1:30`` 90, ``2019-01-01`` a date. Under a key that holds text (a run name, a tag) the reader keeps them as
written, so that ``run: {name: 010}`` does not name run 8. A key written twice in one mapping is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from vegan_scale import stored_json
from vegan_scale.errors import ConfigError

MAX_VALUES = 100_000  # with aliases expanded; a configuration holds a few hundred
MAX_BYTES = 4 << 20  # a configuration is a few kilobytes of text
STR_TAG = "tag:yaml.org,2002:str"
RETYPED = {f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool", "timestamp")}  # by a scalar's look


def read_yaml(path: Path, takes_text: Callable[[str], bool] = lambda key: False) -> Any:
    """The data of the YAML file at ``path`` (None when it is empty), built by PyYAML's safe loader; a plain scalar
    under a dotted key for which ``takes_text`` holds (in a list there too) is kept as the text written.

    A ConfigError names the file when it is larger than MAX_BYTES or not valid YAML (text in UTF-8 or UTF-16), nests
    deeper than Python can follow, holds a value that contains itself, or stands for more than MAX_VALUES values
    once its aliases are expanded. OSError (a missing file) is left to the caller, which knows what the file is for.
    """
    try:
        data = stored_json.read(path, MAX_BYTES)
    except stored_json.NotRegularFile:
        raise ConfigError(
            f"{path} is not a regular file (a pipe, a device or a directory), so not a configuration"
        ) from None
    except ValueError:
        raise ConfigError(
            f"{path}: larger than {MAX_BYTES >> 20} MiB, so not a configuration; is it the right file?"
        ) from None
    try:
        loader = yaml.SafeLoader(data)
        node = loader.get_single_node()
        if node is None:
            return None
        values = _values(node, {}, path)
        if values > MAX_VALUES:
            raise ConfigError(
                f"{path}: holds {values:,} values with its aliases (*name) expanded, more than the {MAX_VALUES:,} a "
                "configuration may hold; write the values out, or nest fewer aliases"
            )
        _keep_text(node, "", takes_text)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML{_told(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested more deeply than Python can follow; it is not a configuration") from None


def _told(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line, with its place as an editor counts (line and column from 1): its own text spans
    several lines and names the parser's input ("<byte string>"), not the file."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f": {' '.join(str(error).split())}"
    told = f" at line {error.problem_mark.line + 1}, column {error.problem_mark.column + 1}: {error.problem}"
    if error.context and error.context_mark is not None:
        told += f" ({error.context} at line {error.context_mark.line + 1}, column {error.context_mark.column + 1})"
    return told


def _values(node: yaml.Node, sizes: dict[int, int | None], path: Path) -> int:
    """How many values ``node`` stands for with its aliases expanded. ``sizes`` holds the nodes measured so far
    (a node shared through aliases is measured once), None for those being measured: meeting one again means a
    value that contains itself."""
    if id(node) in sizes:
        size = sizes[id(node)]
        if size is None:
            raise ConfigError(f"{path}: an alias (*name) refers to a value that contains it; write the value out")
        return size
    sizes[id(node)] = None
    if isinstance(node, yaml.MappingNode):
        _once_each(node, path)
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    size = 1 + sum(_values(child, sizes, path) for child in children)
    sizes[id(node)] = size
    return size


def _once_each(node: yaml.MappingNode, path: Path) -> None:
    """Refuse a key written twice in one mapping: PyYAML keeps the last, so the first (perhaps the one a person
    edited) would be dropped without a word."""
    seen: dict[str, int] = {}
    for name, _ in node.value:
        if not isinstance(name, yaml.ScalarNode) or name.value == "<<":  # merge keys may repeat
            continue
        line = name.start_mark.line + 1
        if name.value in seen:
            raise ConfigError(
                f"{path}: key {name.value!r} is written twice in one mapping (lines {seen[name.value]} and {line}); "
                "keep one"
            )
        seen[name.value] = line


def _keep_text(node: yaml.Node, key: str, takes_text: Callable[[str], bool]) -> None:
    """Tag as text the plain scalars under keys that hold text (``key``: the dotted key of ``node``). The walk
    follows aliases, as measured by :func:`_values` first."""
    if isinstance(node, yaml.MappingNode):
        for name, value in node.value:
            if isinstance(name, yaml.ScalarNode):
                _keep_text(value, f"{key}.{name.value}" if key else name.value, takes_text)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _keep_text(item, key, takes_text)
    elif node.style is None and node.tag in RETYPED and takes_text(key):
        node.tag = STR_TAG
