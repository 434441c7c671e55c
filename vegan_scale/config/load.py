"""Compose an experiment from YAML files and command-line overrides onto the typed schema.

Precedence, lowest first: schema defaults < parent files (``inherit:``, in order, recursively) < the experiment
file < ``key.sub=value`` overrides. Each source is merged on its own so that an error names the file or override it
came from, the dotted key, and a close match for a misspelt key. The result is a tree of the typed dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vegan_scale.config.fields import describe, leaves, type_name
from vegan_scale.config.schema import SCHEMA_VERSION
from vegan_scale.config.validate import check_experiment, check_values, restore_words
from vegan_scale.config.yaml_file import read_yaml
from vegan_scale.errors import ConfigError

INHERIT_KEY = "inherit"
MAX_NESTING = 16  # the schema nests 3 deep; OmegaConf's merge runs out of Python's stack at about 80


def load_config(
    schema: type,
    path: str | Path | Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    name: str = "the configuration passed in",
) -> Any:
    """The experiment at ``path`` (or the schema defaults when None) with ``overrides`` applied, validated (every
    value, then the rules across keys: see :mod:`vegan_scale.config.validate`).

    ``path`` may also be the experiment itself, as nested mappings (the Python API's dict form; ``name`` says where
    they came from in errors); its ``inherit`` files are then found relative to the working directory.
    """
    if not isinstance(overrides, list | tuple) or not all(isinstance(item, str) for item in overrides):
        raise ConfigError(
            f"overrides must be a list of key.sub=value strings, e.g. ['train.max_steps=200'], got {overrides!r}"
        )
    if isinstance(path, Mapping):
        sources = _with_parents(schema, _own(path), name, Path.cwd(), ())
    else:
        sources = _file_chain(schema, Path(path), ()) if path is not None else []
    overridden = [(f"command-line override {item!r}", _parse_override(schema, item)) for item in overrides]
    return _compose(schema, [*sources, *overridden])


def _own(data: Any) -> Any:
    """A copy of nested mappings and lists, their leaves shared: loading changes the data it reads (a word YAML
    took for a boolean put back, ``inherit`` taken out), never the caller's."""
    if isinstance(data, Mapping):
        return {key: _own(value) for key, value in data.items()}
    return [_own(item) for item in data] if isinstance(data, list) else data


def load_stored(schema: type, path: Path) -> Any:
    """A configuration a run wrote (the config.yaml of a run or a checkpoint), read as plain data: the trainer
    writes every value resolved, so an interpolation or an ``inherit`` in one came from someone else, and reading it
    could leak the environment (``${oc.env:...}``) to a tracking server or read other files."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a configuration must be a mapping of keys, got {type(data).__name__}")
    refuse_references(data, path)
    return _compose(schema, [(str(path), data)])


def refuse_references(data: dict, path: Path) -> None:
    """Stored data (a run's config.yaml, an export's model.yaml) may hold no interpolation (``${...}``, which could
    read the environment) and no ``inherit`` (which could read other files); a ConfigError names what it holds."""
    found = [key for key, text in _strings(data) if "${" in text] + ([INHERIT_KEY] if INHERIT_KEY in data else [])
    if found:
        raise ConfigError(
            f"{path} holds interpolations or inherit ({', '.join(found)}): a stored configuration is plain data, "
            "written resolved by vegan_scale; restore the file as it was written"
        )


def _strings(data: Any, key: str = "") -> list[tuple[str, str]]:
    """(dotted key, text) of every string in nested dicts and lists."""
    if isinstance(data, dict):
        return [found for k, v in data.items() for found in _strings(v, f"{key}.{k}" if key else str(k))]
    if isinstance(data, list):
        return [found for i, v in enumerate(data) for found in _strings(v, f"{key}[{i}]")]
    return [(key, data)] if isinstance(data, str) else []


def _compose(schema: type, sources: list[tuple[str, dict]]) -> Any:
    """The schema with each (name, data) source merged in order, resolved and checked as a whole."""
    cfg = OmegaConf.structured(schema)
    for source, data in sources:
        cfg = _merge(schema, cfg, data, source)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the configuration: {_first_line(e)}") from None
    if obj.schema_version > SCHEMA_VERSION:
        raise ConfigError(
            f"schema_version {obj.schema_version} is newer than this vegan_scale understands ({SCHEMA_VERSION}); "
            "upgrade vegan_scale"
        )
    if found := [key for key, text in _strings(dataclasses.asdict(obj)) if "${" in text]:
        raise ConfigError(
            f"{', '.join(found)} holds '${{' once resolved (an escaped interpolation, \\${{...}}): a run stores its "
            "configuration resolved and reads it back as plain data, where it would be an interpolation; write the "
            "value without '${'"
        )
    check_values(schema, obj)
    check_experiment(obj)
    return obj


def to_yaml(cfg: Any) -> str:
    """The resolved configuration as YAML, as saved in the run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _file_chain(schema: type, path: Path, seen: tuple[Path, ...]) -> list[tuple[str, dict]]:
    """(name, data) of the file's ancestors, parents first, then the file itself."""
    try:
        path = path.resolve()
    except (OSError, RuntimeError) as e:  # a loop of symbolic links
        raise ConfigError(f"config file {path} cannot be resolved: {e}") from None
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"circular inherit: {chain}")
    where = f" (inherited by {seen[-1]})" if seen else ""
    if path.exists() and not path.is_file():
        raise ConfigError(f"config file {path}{where} is not a regular file (a directory, a device or a pipe)")
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}{where}; configs live under configs/, e.g. configs/mnist/wae_mmd.yaml"
        )
    data = read_yaml(path, lambda key: takes_text(schema, key)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return _with_parents(schema, data, str(path), path.parent, (*seen, path))


def _with_parents(schema: type, data: dict, name: str, base: Path, seen: tuple[Path, ...]) -> list[tuple[str, dict]]:
    """The sources of ``data`` (named ``name``): its ``inherit`` files (relative to ``base``), then itself."""
    parents = data.pop(INHERIT_KEY, None)
    parents = [] if parents is None else [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{name}: '{INHERIT_KEY}' must be a file name or a list of file names, got {parents!r}")
    chain: list[tuple[str, dict]] = []
    for parent in parents:
        chain += _file_chain(schema, base / parent, seen)
    return [*chain, (name, data)]


KEY_PART = re.compile(r"[A-Za-z_][\w-]*")


def _parse_override(schema: type, item: str) -> dict:
    """``key.sub=value`` as nested dicts. The value is YAML, except for a key that holds text, which takes it as
    typed: YAML reads ``run.name=010`` as the number 8 and ``0x10`` as 16, so two runs would share a directory."""
    key, sep, text = item.partition("=")
    if not sep or not key or key.startswith("-"):
        raise ConfigError(
            f"override {item!r} is not of the form key.sub=value (no leading dashes), e.g. train.max_steps=200"
        )
    parts = key.split(".")
    if not all(KEY_PART.fullmatch(part) for part in parts):
        raise ConfigError(
            f"override {item!r}: the key must be names joined by dots, e.g. train.max_steps=200; a list is given "
            "whole, e.g. optim.betas=[0.5,0.999]"
        )
    if not text:
        unset = f"write {key}=null to unset it" if _kind(schema, key).endswith("| None") else "give it a value"
        raise ConfigError(f"override {item!r} has no value: {unset}")
    if text[0] in "'\"" or text in ("null", "~") or not takes_text(schema, key):
        try:
            return OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {_first_line(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_first_line(e)})") from None
        except RecursionError:  # OmegaConf's parser of a value nested about 80 deep
            raise ConfigError(
                f"override {key}=...: its value is nested more deeply than a configuration can be"
            ) from None
    value: Any = text
    for part in reversed(parts):
        value = {part: value}
    return value


def takes_text(schema: type, key: str) -> bool:
    """Whether ``key`` holds text: a str key, or an entry of a dict[str, str] one (tracking.tags.<name>)."""
    return _kind(schema, key) in ("str", "str | None") or _kind(schema, key.rpartition(".")[0]) == "dict[str, str]"


def _kind(schema: type, key: str) -> str:
    """The type of leaf ``key`` as written in the schema (``int | None``); empty for a key that is not a leaf."""
    return next((type_name(field) for name, field, _ in leaves(schema) if name == key), "")


def _merge(schema: type, cfg: DictConfig, data: dict, source: str) -> DictConfig:
    if _deeper_than(MAX_NESTING, data):
        raise ConfigError(
            f"{source}: nested more than {MAX_NESTING} levels deep; no key of the configuration is (its keys are "
            "listed by vegan-scale config --describe)"
        )
    restore_words(schema, data, f"{source}: ")
    try:
        merged = OmegaConf.merge(cfg, data)
        # Every earlier source passed this check, so a value out of bounds now came from this one. The check
        # resolves interpolations (${...}), which may name a key or a variable that is not there.
        check_values(schema, merged, f"{source}: ")
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"{source}: unknown key '{key}'{_hint(schema, key)}") from None
    except OmegaConfBaseException as e:
        where = f"key '{e.full_key}': " if e.full_key else ""
        raise ConfigError(f"{source}: {where}{_first_line(e)}") from None
    except (TypeError, ValueError) as e:  # OmegaConf's own, e.g. a mapping merged into a list
        raise ConfigError(f"{source}: {e}") from None
    return merged


def _deeper_than(levels: int, data: Any) -> bool:
    if levels < 0:
        return True
    children = data.values() if isinstance(data, Mapping) else data if isinstance(data, list) else ()
    return any(_deeper_than(levels - 1, child) for child in children)


ALIASES = {  # what other trainers and the WAE code call a key (by its last part), where spelling finds another
    "batch_size": "train.global_batch_size",  # else train.micro_batch_size: a cap, the batch silently unchanged
    "batch": "train.global_batch_size",
    "learning_rate": "optim.lr",
    "lambda": "penalty.weight",
    "reg_weight": "penalty.weight",
    "zdim": "model.latent_dim",
    "z_dim": "model.latent_dim",
    "num_epochs": "train.epochs",
    "epoch_num": "train.epochs",
}


def _hint(schema: type, key: str) -> str:
    """What to say after "unknown key": how a file writes a dotted key, or the key most likely meant. A key of that
    name in another section comes before spelling (``train.lr`` is ``optim.lr``, not ``train``), and the names
    of other trainers before both (``train.batch_size`` was taken for ``train.micro_batch_size``)."""
    known = [row[0] for row in describe(schema)]
    sections = {k.rsplit(".", 1)[0] for k in known if "." in k}
    if key in known or key in sections:  # a YAML file read "train.max_steps" as one name, in no section
        nested = key.split(".")
        return f"; a file nests keys: write {': {'.join(nested)}: VALUE{'}' * (len(nested) - 1)}"
    leaf = key.rsplit(".", 1)[-1]
    namesakes = sorted((k for k in known if k.rsplit(".", 1)[-1] == leaf), key=lambda k: (k.count("."), k))
    matches = difflib.get_close_matches(key, [*known, *sections], n=1, cutoff=0.6)
    hint = ALIASES.get(leaf.lower()) or next(iter(namesakes), None) or next(iter(matches), None)
    return f"; did you mean '{hint}'?" if hint else ""


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
