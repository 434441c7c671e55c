"""Checkpoints: complete or absent, loadable without executing code.

Layout under ``<run_dir>/checkpoints/``::

    step_00001000/              one directory per saved step, zero-padded so that names sort by step
      <module>.safetensors      whole weights of each trained module (autoencoder, critic), unwrapped, float32
                                masters under DeepSpeed's half-precision modes
      <module>.optim.safetensors  its Adam state by parameter name, whole: ``<param>/exp_avg``,
                                ``<param>/exp_avg_sq``, ``<param>/step``
      rng_rank<R>.pt            every process's random generator states (torch, CUDA, Python, NumPy)
      scaler.pt                 the fp16 gradient scaler's state (fp16 runs)
      state.json                step, micro-batches consumed, epoch, world size, distribution mode, MLflow run id,
                                and every other file of the checkpoint with its size and sha256 (what a resume checks)
      config.yaml               the resolved configuration the run had when it saved
      COMPLETE                  written last: a directory without it is ignored
    latest                      name of the newest complete checkpoint, replaced atomically

The weights and optimizer state are whole and keyed by parameter name in every distribution mode (single process,
DDP, ZeRO-2, ZeRO-3), so a checkpoint continues at any world size and in any mode (docs/design.md, Checkpoint
format). A checkpoint is written under ``step_N.tmp``; when every part is there, everything inside is fsynced,
``COMPLETE`` is written (durably), and the directory is renamed (and its parent fsynced), so a crash or power loss
mid-save leaves either the previous state or a ``.tmp`` directory that nothing reads. Which checkpoints count as
complete is :mod:`vegan_scale.rundir`'s to say. Tensors are safetensors; the few ``.pt`` files are read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pickle
import random
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vegan_scale import atomic, stored_json
from vegan_scale.errors import CheckpointError
from vegan_scale.rundir import COMPLETE, LATEST, checkpoint_name, complete_checkpoints, named_step

log = logging.getLogger(__name__)

STATE = "state.json"
CONFIG = "config.yaml"
SCALER = "scaler.pt"
AUTOENCODER, CRITIC = "autoencoder", "critic"  # the trained modules, by the names their files carry


# What a write that fails raises: OSError (a full disk or quota, read-only or failing storage, with its errno) or,
# from safetensors' writer, SafetensorError ("I/O error: No space left on device"). torch.save's own writer would
# say only "unexpected pos", so the small torch files are serialized in memory and written by Python.
WRITE_ERRORS = (OSError, SafetensorError)


def _torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic.naming(path):
        path.write_bytes(buffer.getvalue())


def tmp_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written (under the ``checkpoints/`` folder ``root``) until complete."""
    return atomic.tmp_path(root / checkpoint_name(step))


def rank_state_file(directory: Path, rank: int) -> Path:
    return directory / f"rng_rank{rank}.pt"


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
    _torch_save(state, rank_state_file(directory, rank))


def read_rank_state(directory: Path, rank: int) -> dict[str, Any]:
    """What ``write_rank_state`` saved for ``rank`` (read and checked, not applied)."""
    state = safe_load(rank_state_file(directory, rank))
    if not isinstance(state, dict) or not {"torch", "python", "numpy"} <= state.keys():
        raise CheckpointError(f"{rank_state_file(directory, rank)} is not a random-generator state: it is damaged")
    return state


def apply_rank_state(state: dict[str, Any]) -> None:
    """Set this process's random generators to a state ``read_rank_state`` returned."""
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
    directory: Path, name: str, state_dict: dict[str, torch.Tensor], optimizer_state: dict[str, torch.Tensor] | None
) -> None:
    """A module's weights and, unless None, its optimizer's state by parameter name (both safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, module_file(directory, name))
    if optimizer_state is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in optimizer_state.items()}, optimizer_file(directory, name)
        )


def save_scaler(directory: Path, state: dict[str, Any]) -> None:
    """The fp16 gradient scaler's state (tensors and plain values, readable with weights_only)."""
    _torch_save(state, directory / SCALER)


def read_scaler(directory: Path) -> dict[str, Any] | None:
    """The gradient scaler's state, or None where the run had no scaler."""
    return safe_load(directory / SCALER) if (directory / SCALER).exists() else None


def write_state(directory: Path, state: dict[str, Any], config_yaml: str) -> None:
    """Main process, once every process has written its part: the configuration the checkpoint was made under,
    then ``state.json``: the step, data position and run identity, and every file of the checkpoint with its size,
    which a resume requires (see :func:`verify`)."""
    (directory / CONFIG).write_text(config_yaml)
    paths = {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE}
    files = {name: p.stat().st_size for name, p in paths.items()}
    digests = {name: _sha256(p) for name, p in paths.items()}
    (directory / STATE).write_text(json.dumps({**state, "files": files, "sha256": digests}, indent=1))


def _sha256(file: Path) -> str:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = stored_json.load(path / STATE)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / STATE} cannot be read ({e}): the checkpoint is damaged") from None
    expected = {"step": int, "world_size": int, "deepspeed": bool}
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in expected.items()):
        raise CheckpointError(f"{path / STATE} lacks the step, world size or mode: the checkpoint is damaged")
    weight = state.get("penalty_weight", 0.0)  # the adaptive lambda where the run left it (absent: the config's)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < math.inf:
        raise CheckpointError(f"{path / STATE} holds penalty_weight {weight!r}, not a finite weight >= 0: damaged")
    named = named_step(path)
    if state["step"] < 0 or (named is not None and state["step"] != named):
        raise CheckpointError(
            f"{path / STATE} holds step {state['step']} in {path.name}: the checkpoint is damaged, or another was "
            "copied under its name"
        )
    return state


def verify(path: Path, names: Collection[str] | None = None) -> dict[str, Any]:
    """The state of a checkpoint whose every promised file is there and whole (by size, then by its sha256: bytes
    damaged in place keep a file's size); else a CheckpointError naming the file. Each file is read once for its
    digest (a fraction of a second for the conv pair's 200 MB), then by its loader. ``names``: only these files, for
    a reader of the weights (an export, an evaluation), which checkpoints of earlier versions (no list) pass."""
    state = read_state(path)
    files = state.get("files")
    if not isinstance(files, dict):
        if names is not None:
            return state
        raise CheckpointError(
            f"{path / STATE} lists no files: the checkpoint was written by an earlier version of vegan_scale; "
            "continue from a checkpoint of this version, or start a new run from its weights (train.init_from)"
        )
    digests = state.get("sha256") if isinstance(state.get("sha256"), dict) else {}  # none before they were kept
    for name, size in files.items():
        if names is not None and name not in names:
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"refusing to load {path}: {file} is missing, though {STATE} lists it")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"refusing to load {file}: it holds {file.stat().st_size} bytes where {STATE} lists {size} "
                "(damaged or replaced)"
            )
        if name in digests and _sha256(file) != digests[name]:
            raise CheckpointError(
                f"refusing to load {file}: its bytes differ from those written ({STATE}'s sha256): damaged in place"
            )
    return state


def commit(root: Path, step: int, keep_last_k: int) -> Path:
    """Main process, after every process has written its part: sync, mark complete, publish, prune old ones."""
    path = tmp_dir(root, step)
    (path / COMPLETE).write_bytes(b"")  # it counts once the directory has its final name, synced first
    final = atomic.publish_dir(path, root / checkpoint_name(step))
    atomic.write_text(root / LATEST, final.name + "\n")
    # Only checkpoints older than this one are pruned: a newer one is damaged (the run fell back past it) or of a
    # branch continued from elsewhere, and counting it would remove the checkpoints written since.
    older = [p for p in complete_checkpoints(root) if named_step(p) < step]
    for old in older[: max(0, len(older) - (max(1, keep_last_k) - 1))]:
        try:
            _remove(old)
        except OSError as e:  # the checkpoint is written: an old one that stays is no reason to stop
            log.warning("could not remove the old checkpoint %s (%s); remove it by hand", old, e)
    return final


def _remove(old: Path) -> None:
    """Delete a checkpoint, first renaming it out of use: whoever looks for the newest (``vegan-scale eval`` on a
    run that trains on) then finds it whole or not at all, never half deleted, and whoever was reading it sees it
    gone and reads the newest again (:meth:`vegan_scale.rundir.RunDir.read_newest`). One left by a crash between
    the two steps was removed when the run started (:meth:`vegan_scale.rundir.RunDir.prepare`). A checkpoint that
    is a link to other storage loses its link only."""
    gone = atomic.tmp_path(old)
    old.rename(gone)
    atomic.remove(gone)


def module_file(path: Path, name: str = AUTOENCODER) -> Path:
    """Where a checkpoint directory holds a module's whole weights (in every distribution mode)."""
    return path / f"{name}.safetensors"


def existing_module_file(path: Path, name: str = AUTOENCODER) -> Path:
    """:func:`module_file`, which must exist (else a CheckpointError that says what the checkpoint holds)."""
    file = module_file(path, name)
    if not file.exists():
        present = ", ".join(sorted(p.name for p in path.iterdir())) if path.is_dir() else "nothing"
        raise CheckpointError(
            f"{file} not found (the checkpoint holds {present}): it was written by another version of vegan_scale "
            "or is damaged; evaluate or resume from a checkpoint of this version"
        )
    return file


def optimizer_file(path: Path, name: str = AUTOENCODER) -> Path:
    return path / f"{name}.optim.safetensors"


def read_module(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A module's weights from a checkpoint directory."""
    return _read_tensors(existing_module_file(path, name))


def read_optimizer(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A module's optimizer state by parameter name (see the layout above)."""
    file = optimizer_file(path, name)
    if not file.exists():
        raise CheckpointError(
            f"{file} not found: the checkpoint was written by an earlier version of vegan_scale (optimizer state "
            "in another format); continue from a checkpoint of this version, or start a new run from its weights "
            "(train.init_from)"
        )
    return _read_tensors(file)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(file)
    except Exception as e:  # safetensors reports a damaged header or short file in several ways
        raise CheckpointError(f"{file} cannot be read ({_first_line(e)}): it is damaged") from None
    broken = first_non_finite(tensors)
    if broken is not None:  # a run checks its parameters before each checkpoint: this is damage, not training
        raise CheckpointError(f"{file}: {broken} holds NaN or infinite values, which no checkpoint is written with")
    return tensors


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor with a NaN or an infinity: bytes damaged in place keep a file's
    size, and a weight turned NaN would otherwise end every continuation as a loss gone NaN."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def safe_load(path: Path, allowed: list[type] = (), map_location: Any = None) -> Any:
    """``torch.load`` that unpickles only tensors, plain values and the ``allowed`` classes; anything else (code a
    tampered file would run) is refused with a CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"[^\n.]*(?:GLOBAL|[Uu]nsupported)[^\n]*", str(e))
        detail = f" ({found.group(0).strip().rstrip('.')})" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds more than tensors and plain values{detail}; the file is not what "
            "vegan_scale or DeepSpeed wrote, and nothing in it is run"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is damaged") from None
    except Exception as e:  # a truncated or overwritten file: torch reports it in several ways
        raise CheckpointError(f"{path} cannot be read ({_first_line(e)}): it is damaged") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
