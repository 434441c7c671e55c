"""Documented, validated dataclass fields for the configuration schema.

Every field of every config dataclass is declared with :func:`param`, which stores its documentation and, where
they apply, the string choices or the numeric range it allows in the field's metadata. The loader checks values
against them (naming the dotted key), and ``vegan-scale config --describe`` and the generated reference show them.
A :class:`Requirement` states what one setting needs of another (``penalty.kind=kl`` needs a Gaussian encoder).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a key allows (each element, for a list): ``low``/``high`` bounds, each inclusive or not."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # an int is compared exactly, however large
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return self.high is None or value < self.high or (value == self.high and self.high_inclusive)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {_number(self.low)}"
        if self.low is None:
            return f"{'<=' if self.high_inclusive else '<'} {_number(self.high)}"
        low, high = _number(self.low), _number(self.high)
        return f"{'[' if self.low_inclusive else '('}{low}, {high}{']' if self.high_inclusive else ')'}"


def _number(bound: float | None) -> str:
    """An integer bound in full (a seed's 4294967295, not 4.29497e+09), any other as %g."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


POSITIVE = Range(0, low_inclusive=False)
SECONDS = Range(0, 10**9, low_inclusive=False)  # a wait; Python's timers and timedelta refuse much longer ones
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number: below it, a factor rounds towards 0
POSITIVE_FLOAT32 = Range(FLOAT32_TINY, FLOAT32_MAX)  # a scale that becomes part of a float32 tensor
FLOAT32 = Range(0, FLOAT32_MAX)  # the same where 0 has a meaning (no penalty, weights left as they are)


def at_least(low: float) -> Range:
    return Range(low)


def param(default: Any, doc: str, *, choices: tuple[str, ...] | None = None, bounds: Range | None = None) -> Any:
    """A dataclass field with a docstring and, optionally, the values (``choices``) or numbers (``bounds``) it
    may take."""
    metadata = {"doc": doc, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, doc: str) -> Any:
    """A nested config section with its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "choices": None, "bounds": None})


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return type(value)(value)


@dataclasses.dataclass(frozen=True)
class Requirement:
    """When ``when`` (a dotted key) equals ``value``, the key ``needs`` must be one of ``allowed``."""

    when: str
    value: Any
    needs: str
    allowed: tuple[Any, ...]


class Key(NamedTuple):
    """One leaf key of a schema, as the reference and ``--describe`` show it."""

    key: str
    type_name: str
    default: Any
    doc: str
    choices: tuple[str, ...] | None


def leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field of a schema as (dotted key, field, default), in declaration order."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(leaves(type(value), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", f, value))
    return rows


def type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def section_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """{dotted section path: its doc} for every nested section of a schema."""
    docs: dict[str, str] = {}
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            docs[f"{prefix}{f.name}"] = f.metadata.get("doc", "")
            docs |= section_docs(type(value), f"{prefix}{f.name}.")
    return docs


def describe(cls: type) -> list[Key]:
    """Every leaf key of a schema with its type name, default, doc and choices, in declaration order."""
    return [
        Key(key, type_name(f), value, f.metadata.get("doc", ""), f.metadata.get("choices"))
        for key, f, value in leaves(cls)
    ]


def in_use(obj: Any) -> dict[str, Any]:
    """A configuration as nested dicts without the option sections its choices leave unused: with
    ``penalty.kind=mmd`` the ``penalty.adversarial`` and ``penalty.sliced`` sections say nothing about the run, so
    a tracker that records them would show settings that had no effect."""
    chosen = {
        getattr(obj, f.name) for f in dataclasses.fields(obj) if f.metadata.get("choices") and not _is_section(obj, f)
    }
    offered = {c for f in dataclasses.fields(obj) for c in f.metadata.get("choices") or ()}
    return {
        f.name: in_use(getattr(obj, f.name)) if _is_section(obj, f) else getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if not (_is_section(obj, f) and f.name in offered and f.name not in chosen)
    }


def _is_section(obj: Any, f: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(getattr(obj, f.name))
