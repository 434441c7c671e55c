"""Compose an experiment from YAML files and command-line overrides onto the typed schema.

Precedence, lowest first: schema defaults < parent files (``inherit:``, in order, recursively) < the experiment
file < ``key.sub=value`` overrides. Each source is merged on its own so that an error names the file or override it
came from, the dotted key, and a close match for a misspelt key. The result is a tree of the typed dataclasses.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vegan_scale.config.fields import describe
from vegan_scale.config.schema import SCHEMA_VERSION
from vegan_scale.config.validate import check_experiment, check_values, restore_words
from vegan_scale.config.yaml_file import read_yaml
from vegan_scale.errors import ConfigError

INHERIT_KEY = "inherit"


def load_config(schema: type, path: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Any:
    """The experiment at ``path`` (or the schema defaults when None) with ``overrides`` applied, validated (every
    value, then the rules across keys: see :mod:`vegan_scale.config.validate`).

    ``path`` may also be the experiment itself, as nested mappings (the Python API's dict form); its ``inherit``
    files are then found relative to the working directory.
    """
    cfg = OmegaConf.structured(schema)
    if isinstance(path, Mapping):
        sources = _with_parents(dict(path), "the configuration passed in", Path.cwd(), ())
    else:
        sources = _file_chain(Path(path), ()) if path is not None else []
    for source, data in sources:
        cfg = _merge(schema, cfg, data, source)
    for item in overrides:
        cfg = _merge(schema, cfg, _parse_override(item), f"command-line override {item!r}")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the configuration: {_first_line(e)}") from None
    if obj.schema_version > SCHEMA_VERSION:
        raise ConfigError(
            f"schema_version {obj.schema_version} is newer than this vegan_scale understands ({SCHEMA_VERSION}); "
            "upgrade vegan_scale"
        )
    check_values(schema, obj)
    check_experiment(obj)
    return obj


def to_yaml(cfg: Any) -> str:
    """The resolved configuration as YAML, as saved in the run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _file_chain(path: Path, seen: tuple[Path, ...]) -> list[tuple[str, dict]]:
    """(name, data) of the file's ancestors, parents first, then the file itself."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"circular inherit: {chain}")
    if not path.is_file():
        where = f" (inherited by {seen[-1]})" if seen else ""
        raise ConfigError(
            f"config file not found: {path}{where}; configs live under configs/, e.g. configs/mnist/wae_mmd.yaml"
        )
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return _with_parents(data, str(path), path.parent, (*seen, path))


def _with_parents(data: dict, name: str, base: Path, seen: tuple[Path, ...]) -> list[tuple[str, dict]]:
    """The sources of ``data`` (named ``name``): its ``inherit`` files (relative to ``base``), then itself."""
    parents = data.pop(INHERIT_KEY, None)
    parents = [] if parents is None else [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{name}: '{INHERIT_KEY}' must be a file name or a list of file names, got {parents!r}")
    chain: list[tuple[str, dict]] = []
    for parent in parents:
        chain += _file_chain(base / parent, seen)
    return [*chain, (name, data)]


def _parse_override(item: str) -> dict:
    key, sep, _ = item.partition("=")
    if not sep or not key or key.startswith("-"):
        raise ConfigError(
            f"override {item!r} is not of the form key.sub=value (no leading dashes), e.g. train.max_steps=200"
        )
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r}: {_first_line(e)}") from None


def _merge(schema: type, cfg: DictConfig, data: dict, source: str) -> DictConfig:
    restore_words(schema, data)
    try:
        merged = OmegaConf.merge(cfg, data)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        hint = _close_match(schema, key)
        raise ConfigError(f"{source}: unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")) from None
    except OmegaConfBaseException as e:
        where = f"key '{e.full_key}': " if e.full_key else ""
        raise ConfigError(f"{source}: {where}{_first_line(e)}") from None
    # Every earlier source passed this check, so a value out of bounds now came from this one.
    check_values(schema, merged, f"{source}: ")
    return merged


def _close_match(schema: type, key: str) -> str | None:
    known = [row[0] for row in describe(schema)]
    sections = {k.rsplit(".", 1)[0] for k in known if "." in k}
    matches = difflib.get_close_matches(key, [*known, *sections], n=1, cutoff=0.6)
    return matches[0] if matches else None


def _first_line(e: Exception) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return msg.strip().splitlines()[0]


def flat_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"section.key": value}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
