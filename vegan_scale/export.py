"""Exported models: consolidated weights (safetensors) and the configuration that rebuilds the network.

An export directory holds ``model.safetensors`` (the auto-encoder's full weights, float32, whatever the run's
precision and distribution mode) and ``model.yaml`` (the ``data``, ``model`` and ``prior`` sections of the run's
configuration: a partial experiment file). Loading needs neither DeepSpeed nor accelerate and executes nothing
from the files. The weights file's metadata holds the sha256 of its tensors and of the model.yaml written with them,
checked at every load: bytes damaged in place keep the file's size and its values finite, and a model.yaml changed
(the decoder's output range, the prior) still fits the weights while rebuilding another model.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vegan_scale import atomic, stored_json
from vegan_scale.config.load import flat_keys, refuse_references
from vegan_scale.config.yaml_file import read_yaml
from vegan_scale.errors import ConfigError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model.yaml"
SECTIONS = ("data", "model", "prior")
DIGEST_KEY, STEP_KEY = "sha256", "step"  # in the weights file's metadata
CONFIG_DIGEST_KEY = "model_yaml_sha256"  # there too: the model.yaml written with the weights
EVAL_FILE = "eval.json"  # what `vegan-scale eval` of an export outside a run writes beside it
OWN_FILES = {name + suffix for name in (MODEL_FILE, CONFIG_FILE, EVAL_FILE) for suffix in ("", atomic.TMP_SUFFIX)}


def model_sections(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved configuration (as nested dicts) that define the network and its prior."""
    data = {k: config["data"][k] for k in ("image_size", "channels", "input_range") if k in config["data"]}
    return {"data": data, "model": config["model"], "prior": config["prior"]}


def write(
    directory: Path,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    step: int,
    remedy: str = "choose another output directory",
) -> Path:
    """Write an export, each file atomically and durably, into a new or empty directory or over an earlier export
    (never among other files, which would read as part of it). model.yaml marks an export, so it goes last, and a
    previous export's is removed first: an export replaced in place and interrupted between its two files is no
    export, never new weights read with the old configuration. The previous export's evaluation (``eval.json``)
    goes too: it measured other weights. ``step``: the training step of the weights, kept in the weights file's
    metadata (:func:`step_of`). ``remedy``: what to do about other files, said in the ConfigError."""
    directory.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in directory.iterdir() if p.name not in OWN_FILES)
    if others:
        raise ConfigError(
            f"{directory} holds other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): an export "
            f"goes into a new or empty directory, or over an earlier export; {remedy}"
        )
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    (directory / EVAL_FILE).unlink(missing_ok=True)
    weights = {
        k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state_dict.items()
    }
    text = yaml.safe_dump(model_sections(config), sort_keys=False)
    metadata = {DIGEST_KEY: _digest(weights), STEP_KEY: str(step), CONFIG_DIGEST_KEY: _sha256(text.encode())}
    with atomic.writing(directory / MODEL_FILE) as tmp:
        try:
            save_file(weights, tmp, metadata=metadata)
        except SafetensorError as e:
            raise atomic.os_error_of(e, directory / MODEL_FILE) from e
    atomic.write_text(directory / CONFIG_FILE, text)
    return directory


def read(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(weights, path of model.yaml) of an export directory; a clear error when it is not one."""
    directory = Path(directory)
    check_is_export(directory)
    return load_weights(directory / MODEL_FILE), directory / CONFIG_FILE


def load_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of an export's weights file, refused when they differ from those written (the sha256 its
    metadata holds; exports of versions before it have none, and are read unchecked)."""
    with _opened(file) as f:  # the tensors and the metadata, in one opening
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        written = (f.metadata() or {}).get(DIGEST_KEY)
    if written is not None and _digest(tensors) != written:
        raise ConfigError(
            f"refusing to load {file}: its tensors differ from those written (the sha256 in its metadata): damaged in "
            "place; export the model again from its checkpoint (`vegan-scale export CHECKPOINT --out DIR`)"
        )
    return tensors


def step_of(directory: Path) -> int | None:
    """The training step of an export's weights; None for an export written before it was kept."""
    with _opened(Path(directory) / MODEL_FILE) as f:
        step = (f.metadata() or {}).get(STEP_KEY)
    return int(step) if step is not None and step.isdigit() else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names, types, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def is_export(directory: Path) -> bool:
    """Whether ``directory`` holds a whole export: model.yaml, written last, marks one (weights without it are an
    export interrupted between its two files)."""
    return not _missing(directory)


def check_is_export(directory: Path) -> None:
    """A ConfigError naming what an export directory lacks, unless it is one."""
    missing = _missing(directory)
    if missing:
        raise ConfigError(
            f"{directory} is not an exported model (missing {', '.join(missing)}); export one with "
            "`vegan-scale export CHECKPOINT --out DIR` or use a run's export/ directory"
        )


def _missing(directory: Path) -> list[str]:
    return [f for f in (MODEL_FILE, CONFIG_FILE) if not (directory / f).exists()]


def read_sections(directory: Path) -> dict[str, Any]:
    """model.yaml of an export as plain data: it may hold no interpolation (``${...}``, which could read the
    environment) and no ``inherit`` (which could read other files); a ConfigError says what it holds instead."""
    directory = Path(directory)
    check_is_export(directory)
    path = directory / CONFIG_FILE
    sections = read_yaml(path)
    if not isinstance(sections, dict) or set(sections) - set(SECTIONS):
        raise ConfigError(f"{path} must hold only the sections {', '.join(SECTIONS)}: it is not an export's")
    refuse_references(sections, path)
    with _opened(directory / MODEL_FILE) as f:
        written = (f.metadata() or {}).get(CONFIG_DIGEST_KEY)
    if written is not None and _sha256(path.read_bytes()) != written:  # a regular file: read_yaml checked
        raise ConfigError(
            f"refusing {path}: it differs from the model.yaml written with {MODEL_FILE} (the sha256 in its metadata): "
            "changed or damaged, it would rebuild another model around these weights; export the model again from "
            "its checkpoint (`vegan-scale export CHECKPOINT --out DIR`)"
        )
    return sections


def weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a safetensors file, from its header (no tensor is read)."""
    with _opened(file) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


@contextmanager
def _opened(file: Path) -> Iterator[Any]:
    """A safetensors file opened for reading; a ConfigError naming it when it cannot be read (a header cut short or
    damaged, a directory in its place, or the system's reason, such as a permission), so that every reader of an
    export says the same."""
    try:  # opened here first, without waiting were a FIFO in its place: safetensors said "No such file" for a file
        os.close(stored_json.open_regular(file))  # this user may not read
    except stored_json.NotRegularFile as e:
        raise _not_safetensors(file, e.strerror) from None
    except OSError as e:
        access = "make it readable to this user, or " if e.errno in (errno.EACCES, errno.EPERM) else ""
        raise ConfigError(
            f"{file} cannot be opened ({e.strerror}); {access}export the model again from its checkpoint "
            "(`vegan-scale export CHECKPOINT --out DIR`)"
        ) from None
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise _not_safetensors(file, str(e)[:200]) from None


def _not_safetensors(file: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"{file} is not a readable safetensors file ({reason}): damaged or cut short; export the model again from "
        "its checkpoint (`vegan-scale export CHECKPOINT --out DIR`)"
    )


def check_compatible(directory: Path, config: dict[str, Any], refusal: str) -> None:
    """Refuse an export whose network or prior differs from the configured one (nested dicts): ``refusal`` says
    what is refused, followed by each key that differs."""
    if diffs := differences(read_sections(directory), model_sections(config)):
        raise ConfigError(f"{refusal}: " + "; ".join(diffs))


def differences(exported: dict[str, Any], configured: dict[str, Any]) -> list[str]:
    """Where two sets of model sections (:func:`model_sections`) differ, key by key, as 'key: export X, config Y'."""
    diffs = []
    for section in SECTIONS:
        held = flat_keys(exported.get(section, {}))
        diffs += [
            f"{section}.{key}: export {held.get(key)!r}, config {value!r}"
            for key, value in flat_keys(configured[section]).items()
            if held.get(key) != value
        ]
    return diffs
