"""YAML files read as plain data, safe against files that stand for far more than they hold.

A YAML alias (``*name``) repeats an anchored value without copying it, so nested aliases let a file of a few
hundred bytes stand for billions of values (the "billion laughs"), and an alias inside its own anchor makes a value
that contains itself. Every walk over such data (validation, OmegaConf, the comparison of a continuation's
settings) hangs, runs out of memory or recurses without end. Configuration files, grid files, checkpoints'
config.yaml and exports' model.yaml come from other people and from shared storage, so each is measured before it
is built: aliases are allowed while the data they stand for stay small. A file that is not YAML at all (a shard or
a checkpoint named by mistake) is refused by its size or its bytes, not read whole or decoded in Python, and one
that is not a regular file (a device, a pipe) before anything is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from vegan_scale.errors import ConfigError

MAX_VALUES = 100_000  # with aliases expanded; a configuration holds a few hundred
MAX_BYTES = 4 << 20  # a configuration is a few kilobytes of text


def read_yaml(path: Path) -> Any:
    """The data of the YAML file at ``path`` (None when it is empty), built by PyYAML's safe loader.

    A ConfigError names the file when it is larger than MAX_BYTES or not valid YAML (text in UTF-8 or UTF-16), nests
    deeper than Python can follow, holds a value that contains itself, or stands for more than MAX_VALUES values
    once its aliases are expanded. OSError (a missing file) is left to the caller, which knows what the file is for.
    """
    # Opened without blocking, so that a pipe with no writer (a FIFO named by mistake) is refused, not waited on.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path} is not a regular file (a pipe, a device or a directory), so not a configuration")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES >> 20} MiB, so not a configuration; is it the right file?")
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
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested more deeply than Python can follow; it is not a configuration") from None


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
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    size = 1 + sum(_values(child, sizes, path) for child in children)
    sizes[id(node)] = size
    return size
