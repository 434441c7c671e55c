"""Documented, validated dataclass fields for the configuration schema.

Every field of every config dataclass is declared with :func:`param`, which stores its documentation and, for
string options, the allowed choices in the field's metadata. Three consumers read that metadata: the loader
(to reject a bad choice with the dotted key), ``vegan-scale config --describe`` and the generated reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def param(default: Any, doc: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with a docstring and, optionally, the values it may take."""
    metadata = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, doc: str) -> Any:
    """A nested config section with its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "choices": None})


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return type(value)(value)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str, tuple[str, ...] | None]]:
    """Every leaf key of a schema as (dotted key, type name, default, doc, choices), in declaration order."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), key + "."))
            continue
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((key, type_name, value, f.metadata.get("doc", ""), f.metadata.get("choices")))
    return rows
