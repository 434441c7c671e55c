"""Checkpoints: complete or absent, loadable without executing code.

Layout under ``<run_dir>/checkpoints/``::

    step_00001000/              one directory per saved step, zero-padded so that names sort by step
      <module>.safetensors      weights of each trained module (autoencoder, critic), unwrapped
      <module>.optim.pt         its optimizer state: tensors and plain Python values only
      <module>/                 instead of the two above under DeepSpeed: the engine's own (ZeRO-sharded) files
      rng_rank<R>.pt            every process's random generator states (torch, CUDA, Python, NumPy)
      scaler.pt                 the fp16 gradient scaler's state (fp16 runs)
      state.json                step, micro-batches consumed, epoch, world size, distribution mode, MLflow run id
      config.yaml               the resolved configuration the run had when it saved
      COMPLETE                  written last: a directory without it is ignored
    latest                      name of the newest complete checkpoint, replaced atomically

A checkpoint is written under ``step_N.tmp`` and renamed when complete, so a crash mid-save leaves either the
previous state or a ``.tmp`` directory that nothing reads. ``.pt`` files are read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vegan_scale.errors import CheckpointError

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "state.json"
CONFIG = "config.yaml"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete."""
    return root / (step_dir_name(step) + ".tmp")


def write_rank_state(directory: Path, rank: int) -> None:
    """Every process: the state of every random generator it draws from."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, directory / f"rng_rank{rank}.pt")


def restore_rank_state(directory: Path, rank: int) -> None:
    """Set this process's random generators to what ``write_rank_state`` saved for ``rank``."""
    state = safe_load(directory / f"rng_rank{rank}.pt")
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> dict[str, Any]:
    """NumPy's legacy generator state with its key as a tensor, so that a weights-only load can read it back."""
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples that a weights-only load may hand back as lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_module(
    directory: Path, name: str, state_dict: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None
) -> None:
    """A module's weights (safetensors) and, unless None, its optimizer's state (tensors and plain values)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, directory / f"{name}.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / f"{name}.optim.pt")


def save_tensors(directory: Path, name: str, state: dict[str, Any]) -> None:
    """A small state of tensors and plain values (the gradient scaler's), readable with weights_only."""
    torch.save(state, directory / f"{name}.pt")


def read_tensors(directory: Path, name: str) -> dict[str, Any]:
    return safe_load(directory / f"{name}.pt")


def write_state(directory: Path, state: dict[str, Any], config_yaml: str) -> None:
    """The step, data position and run identity, and the configuration the checkpoint was made under."""
    (directory / STATE).write_text(json.dumps(state, indent=1))
    (directory / CONFIG).write_text(config_yaml)


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commit(root: Path, step: int, keep_last_k: int) -> Path:
    """Main process, after every process has written its part: mark complete, publish, prune old ones."""
    path = tmp_dir(root, step)
    (path / COMPLETE).write_text("")
    final = root / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(path, final)
    _atomic_text(root / LATEST, final.name + "\n")
    complete = complete_checkpoints(root)
    for old in complete[: max(0, len(complete) - max(1, keep_last_k))]:  # never the one just published
        shutil.rmtree(old)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).exists()
    )


def read_module(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A module's weights from a checkpoint directory."""
    file = path / f"{name}.safetensors"
    if not file.exists():
        present = ", ".join(sorted(p.name for p in path.iterdir())) if path.is_dir() else "nothing"
        raise CheckpointError(
            f"{file} not found (the checkpoint holds {present}): it was written by another version of vegan_scale "
            "or is damaged; evaluate or resume from a checkpoint of this version"
        )
    return load_file(file)


def read_optimizer(path: Path, name: str) -> dict[str, Any]:
    """A module's optimizer state; refuses anything but tensors and plain Python values."""
    return safe_load(path / f"{name}.optim.pt")


def safe_load(path: Path, allowed: list[type] = (), map_location: Any = None) -> Any:
    """``torch.load`` that unpickles only tensors, plain values and the ``allowed`` classes; anything else (code a
    tampered file would run) is refused with a CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error: ")[-1].splitlines()[0]
        raise CheckpointError(
            f"refusing to load {path}: it holds more than tensors and plain values ({detail}); "
            "the file is not what vegan_scale or DeepSpeed wrote"
        ) from None
