"""Exports read as data: the weights' shapes are checked against the network before it is built, and model.yaml is
plain data (no interpolation that could read the environment, no inherit that could read other files)."""

from __future__ import annotations

import dataclasses
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

import vegan_scale
from tests.test_config import alias_bomb
from vegan_scale import export
from vegan_scale.errors import ConfigError
from vegan_scale.experiment import load_experiment
from vegan_scale.registry import build_model

SMALL = ["model.network=mlp", "model.mlp.hidden=[16]", "model.latent_dim=4"]


@pytest.fixture()
def exported(tmp_path: Path) -> Path:
    cfg = load_experiment(None, SMALL)
    torch.manual_seed(0)
    return export.write(tmp_path / "export", build_model(cfg).state_dict(), dataclasses.asdict(cfg), 0)


def doctor(directory: Path, key: str, value: object, unbind: bool = True) -> None:
    """Set ``key`` in an export's model.yaml; ``unbind``: drop the weights' digest of model.yaml, as in an export of
    a version before it (or one forged whole), so that the checks behind that digest are what is tested."""
    if unbind:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        file = directory / export.MODEL_FILE
        with safe_open(str(file), framework="pt") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if k != export.CONFIG_DIGEST_KEY}
        save_file(load_file(file), file, metadata=metadata)
    sections = yaml.safe_load((directory / export.CONFIG_FILE).read_text())
    section, _, field = key.partition(".")
    *path, last = field.split(".")
    target = sections[section]
    for part in path:
        target = target[part]
    target[last] = value
    (directory / export.CONFIG_FILE).write_text(yaml.safe_dump(sections))


def test_export_loads_back(exported: Path) -> None:
    model = vegan_scale.load(exported)
    assert model.sample(3).shape == (3, 1, 28, 28)


def test_a_doctored_width_is_refused_before_anything_is_allocated(exported: Path) -> None:
    """model.yaml says the MLP is a million units wide (4 TB of parameters in float32): the shapes in the
    safetensors header are compared with the network built on the meta device first, so the refusal costs nothing."""
    doctor(exported, "model.mlp.hidden", [1_000_000, 1_000_000])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=r"does not hold the weights of the configured network .*network \(1000000"):
        vegan_scale.load(exported)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: under 100 MB


def test_weights_damaged_in_place_are_refused(exported: Path) -> None:
    """A weight turned NaN loaded silently, and eval and sample printed NaN metrics and blank images with exit 0. In
    an export written before its tensors' digest (none in its metadata, as saved here) the NaN itself is refused."""
    from safetensors.torch import load_file, save_file

    file = exported / export.MODEL_FILE
    weights = load_file(file)
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, file)
    with pytest.raises(ConfigError, match=f"{name} holds NaN"):
        vegan_scale.load(exported)


def test_weights_changed_in_place_and_still_finite_are_refused(exported: Path) -> None:
    """One bit of the last weight flipped in place: the file keeps its size and every value stays finite, so only the
    digest the export's metadata holds tells; `vegan_scale.load`, `eval`, `sample` and `train.init_from` read through
    it. An export written before the digest (none in its metadata) still loads."""
    from safetensors.torch import load_file, save_file

    file = exported / export.MODEL_FILE
    raw = bytearray(file.read_bytes())
    raw[-4] ^= 1  # the lowest bit of the last float32's mantissa (little-endian)
    file.write_bytes(bytes(raw))
    assert torch.isfinite(torch.cat([t.flatten().float() for t in load_file(file).values()])).all()
    for load in (vegan_scale.load, export.read):
        with pytest.raises(ConfigError, match=r"its tensors differ from those written .*damaged in place"):
            load(exported)
    save_file(load_file(file), file)  # as written before the digest: no metadata
    vegan_scale.load(exported)


@pytest.mark.parametrize("value", ["${oc.env:HOME}", "${model.latent_dim}"])
def test_interpolation_in_model_yaml_is_refused(exported: Path, value: str) -> None:
    doctor(exported, "prior.kind", value)
    with pytest.raises(ConfigError, match="interpolation"):
        vegan_scale.load(exported)


def test_an_alias_bomb_in_model_yaml_is_refused(exported: Path) -> None:
    """A model.yaml of 600 bytes whose model section stands for 10**10 values is refused before anything walks
    it."""
    (exported / export.CONFIG_FILE).write_text(alias_bomb("model"))
    with pytest.raises(ConfigError, match=f"{export.CONFIG_FILE}: holds .* values with its aliases"):
        vegan_scale.load(exported)


def test_inherit_in_model_yaml_is_refused(exported: Path, tmp_path: Path) -> None:
    text = (exported / export.CONFIG_FILE).read_text()
    (exported / export.CONFIG_FILE).write_text(f"inherit: {tmp_path / 'other.yaml'}\n{text}")
    with pytest.raises(ConfigError, match="only the sections"):
        vegan_scale.load(exported)


KILLED_BETWEEN_FILES = """
import dataclasses, os, signal, sys
from pathlib import Path
from vegan_scale import atomic, export
from vegan_scale.experiment import load_experiment
from vegan_scale.registry import build_model

def killed(path, text):  # the process dies as it starts on the second file: SIGKILL, nothing runs after it
    os.kill(os.getpid(), signal.SIGKILL)

atomic.write_text = killed
cfg = load_experiment(None, sys.argv[2:])
export.write(Path(sys.argv[1]), build_model(cfg).state_dict(), dataclasses.asdict(cfg), 0)
"""


def test_an_export_replaced_in_place_and_killed_between_its_files_is_no_export(exported: Path) -> None:
    """A second export into the same directory, of a model whose weights have the same shapes but whose prior
    differs, killed after its weights and before its model.yaml: the directory is refused as an export, not loaded
    as the new weights under the old configuration (a model that samples from the wrong prior without a word)."""
    from tests.runkit import run

    proc = run([sys.executable, "-c", KILLED_BETWEEN_FILES, str(exported), *SMALL, "prior.scale=4.0"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with pytest.raises(ConfigError, match=f"not an exported model \\(missing {export.CONFIG_FILE}\\)"):
        vegan_scale.load(exported)


def test_an_export_among_other_files_is_refused_and_over_an_earlier_one_replaces_it(
    exported: Path, tmp_path: Path
) -> None:
    """`export --out .` in a project directory, or into a run's checkpoints/, would mix the export with what is
    there: refused, naming what is there, and nothing written. Over an earlier export (a run exported again), it is
    replaced, with the evaluation `vegan-scale eval` wrote beside the earlier one (it refused the new export, and
    measured other weights)."""
    cfg = load_experiment(None, SMALL)
    torch.manual_seed(1)
    weights = build_model(cfg).state_dict()  # not the weights already exported (seed 0)
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"crowded holds other files \(notes\.txt\): an export goes into a new"):
        export.write(crowded, weights, dataclasses.asdict(cfg), 0)
    assert sorted(p.name for p in crowded.iterdir()) == ["notes.txt"]
    (exported / export.EVAL_FILE).write_text("{}")
    export.write(exported, weights, dataclasses.asdict(cfg), 0)
    assert sorted(p.name for p in exported.iterdir()) == [export.MODEL_FILE, export.CONFIG_FILE]
    assert all(torch.equal(weights[k], v) for k, v in export.read(exported)[0].items())


def test_a_fifo_in_place_of_the_weights_is_refused_not_waited_for(exported: Path) -> None:
    """A FIFO (a named pipe left on shared storage) where the weights belong: opening it waited for a writer that
    never came (holding the interpreter's lock, so in a process of its own here). It is refused by name, at once."""
    import os
    import subprocess

    (exported / export.MODEL_FILE).unlink()
    os.mkfifo(exported / export.MODEL_FILE)
    script = "import sys, vegan_scale; vegan_scale.load(sys.argv[1])"
    loaded = subprocess.run([sys.executable, "-c", script, str(exported)], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 1
    assert "model.safetensors is not a readable safetensors file (not a regular file" in loaded.stderr, loaded.stderr


@pytest.mark.parametrize("device", ["cuda", "nonsense", "meta", "", "hpu"])  # hpu: torch imports torch.hpu
def test_a_device_that_cannot_be_used_is_refused_by_name_before_the_weights_are_read(
    exported: Path, device: str
) -> None:
    """torch's AssertionError ("not compiled with CUDA") or RuntimeError came after the weights were read."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    (exported / export.MODEL_FILE).unlink()  # not read: the device is refused first
    with pytest.raises(ConfigError, match=rf"device '{device}' cannot be used here \(.+\); use 'cpu'"):
        vegan_scale.load(exported, device=device)


def test_the_python_api_refuses_a_source_or_a_count_of_the_wrong_kind_by_name(exported: Path) -> None:
    """`load(None)` and `load(5)` were TypeErrors from pathlib, `model.sample(-1)` torch's "negative dimension" and
    `sample(2.5)` randn's TypeError, none naming the argument."""
    for source in (None, 5, b"export"):
        with pytest.raises(ConfigError, match="source must be an export directory or an MLflow model URI"):
            vegan_scale.load(source)
    model = vegan_scale.load(exported)
    for n in (-1, 0, 2.5, float("nan"), "3", True):
        with pytest.raises(ValueError, match=r"sample\(n\) takes a positive whole number of images"):
            model.sample(n)
    assert model.sample(2).shape[0] == 2


def test_a_value_out_of_range_in_model_yaml_names_the_file(exported: Path) -> None:
    """The error said "the configuration passed in", not which file to mend."""
    doctor(exported, "model.latent_dim", -1)
    with pytest.raises(ConfigError, match=rf"^{exported / export.CONFIG_FILE}: model.latent_dim=-1 is out of range"):
        vegan_scale.load(exported)


@pytest.mark.parametrize(("key", "value"), [("data.input_range", "symmetric"), ("prior.kind", "sphere")])
def test_a_model_yaml_changed_beside_its_weights_is_refused(exported: Path, key: str, value: str) -> None:
    """The decoder's output range or the prior changed in model.yaml: the weights still fit, and the model loaded
    gave other reconstructions and samples, silently. The weights' metadata holds model.yaml's sha256; an export
    written before it still loads."""

    def samples() -> torch.Tensor:
        torch.manual_seed(0)
        return vegan_scale.load(exported).sample(2)

    before = samples()
    doctor(exported, key, value, unbind=False)
    with pytest.raises(ConfigError, match=r"model.yaml: it differs from the model.yaml written with model.safetensors"):
        vegan_scale.load(exported)
    doctor(exported, key, value)  # an export of an earlier version: no digest to compare with
    assert not torch.equal(samples(), before)
