"""Checkpoints: complete or absent, loadable without executing code.

Layout under ``<run_dir>/checkpoints/``::

    step_00001000/            one directory per saved step, zero-padded so names sort by step
      model.safetensors       auto-encoder weights (unwrapped, uncompiled)
      critic.safetensors      latent critic weights (adversarial penalties only)
      optim.pt                optimizer and scheduler state dicts: tensors and plain Python values only
      rng_rank<R>.pt          every process's torch RNG state
      state.json              step, epoch, samples seen, world size, MLflow run id
      COMPLETE                written last: a directory without it is ignored
    latest                    name of the newest complete checkpoint, replaced atomically

A checkpoint is written under ``step_N.tmp`` and renamed when complete, so a crash mid-save leaves either the
previous state or a ``.tmp`` directory that nothing reads. ``.pt`` files are read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class CheckpointContent:
    """What the main process saves; ``rng`` is saved by every process under its own rank."""

    model: dict[str, torch.Tensor]
    critic: dict[str, torch.Tensor] | None
    optim: dict[str, Any]
    state: dict[str, Any]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tmp_dir(root: Path, step: int) -> Path:
    return root / (step_dir_name(step) + ".tmp")


def write_rank_state(root: Path, step: int, rank: int) -> None:
    """Every process: its RNG state into the checkpoint being written."""
    path = tmp_dir(root, step)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state()}, path / f"rng_rank{rank}.pt")


def write_main_state(root: Path, step: int, content: CheckpointContent) -> None:
    """Main process: weights, optimizer state and metadata into the checkpoint being written."""
    path = tmp_dir(root, step)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in content.model.items()}, path / "model.safetensors")
    if content.critic is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in content.critic.items()}, path / "critic.safetensors")
    torch.save(content.optim, path / "optim.pt")
    (path / "state.json").write_text(json.dumps(content.state, indent=1))


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


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(auto-encoder, critic or None) weights of a checkpoint directory."""
    critic = path / "critic.safetensors"
    return load_file(path / "model.safetensors"), load_file(critic) if critic.exists() else None


def read_optim(path: Path) -> dict[str, Any]:
    return torch.load(path / "optim.pt", weights_only=True)
