"""How the networks and penalties are built: the builders of each, under the names ``experiment.py`` lists.

Adding a network or a penalty is one new file (its builder and its math), its options in ``models/options.py`` or
``penalties/options.py`` (kept apart so that a configuration is checked without torch) and one line here and in
``experiment.py``. This module sits above the math and the config packages and imports down into both; it turns
the configuration into the plain arguments the math takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vegan_scale import checkpoint, export
from vegan_scale.errors import ConfigError
from vegan_scale.experiment import image_shape, load_experiment
from vegan_scale.models import conv, mlp, pythae_conv, resnet
from vegan_scale.models.autoencoder import AutoEncoder, build_autoencoder
from vegan_scale.models.base import NetworkSpec
from vegan_scale.penalties import adversarial, kernel_mmd, kl, sliced
from vegan_scale.penalties.base import LatentPenalty, PenaltyBuilder
from vegan_scale.priors import Prior

NETWORKS: dict[str, NetworkSpec] = {
    "conv": conv.SPEC,
    "mlp": mlp.SPEC,
    "resnet": resnet.SPEC,
    "pythae_conv": pythae_conv.SPEC,
}
PENALTIES: dict[str, PenaltyBuilder] = {
    "mmd": kernel_mmd.build,
    "adversarial": adversarial.build,
    "kl": kl.build,
    "sliced": sliced.build,
}


def build_prior(cfg: Any) -> Prior:
    return Prior(cfg.prior.kind, cfg.model.latent_dim, cfg.prior.scale)


def build_model(cfg: Any) -> AutoEncoder:
    """The auto-encoder an experiment describes (parameters drawn from the current torch RNG)."""
    m = cfg.model
    return build_autoencoder(
        NETWORKS[m.network],
        getattr(m, m.network),
        image_shape(cfg),
        build_prior(cfg),
        m.encoder,
        m.decoder,
        m.noise_dim,
        input_noise=m.input_noise,
        init_std=m.init_std,
        symmetric=cfg.data.input_range == "symmetric",
    )


def load_model(
    cfg: Any, weights: Path | dict[str, torch.Tensor], device: torch.device | str = "cpu", name: str | None = None
) -> AutoEncoder:
    """The auto-encoder ``cfg`` describes with the weights of a safetensors file (or read from one: ``name`` says
    which), in evaluation mode. The tensor names and shapes are checked against the network, built without memory
    (on the meta device), before anything is allocated: a doctored configuration cannot make it build a huge
    network first."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    read = isinstance(weights, dict)
    found = {k: tuple(v.shape) for k, v in weights.items()} if read else export.weight_shapes(weights)
    if found != expected:
        differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        details = "; ".join(f"{k}: network {expected.get(k)}, file {found.get(k)}" for k in differ[:4])
        raise ConfigError(f"{name or weights} does not hold the weights of the configured network ({details})")
    state = weights if read else export.load_weights(weights)
    broken = checkpoint.first_non_finite(state)
    if broken is not None:
        raise ConfigError(f"{name or weights}: {broken} holds NaN or infinite values: the weights are damaged")
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.to(device).eval()


def load_export(directory: str | Path, device: torch.device | str = "cpu") -> AutoEncoder:
    """The auto-encoder of an export directory (``model.safetensors`` + ``model.yaml``), in evaluation mode.
    Nothing in the files is executed or interpolated (see :func:`vegan_scale.export.read_sections`), and the
    weights' shapes are checked before the network is built."""
    directory = Path(directory)
    return load_model(export_experiment(directory), directory / export.MODEL_FILE, device)


def export_experiment(directory: Path) -> Any:
    """The experiment an export's ``model.yaml`` describes, checked as a configuration file is (errors name it)."""
    return load_experiment(export.read_sections(directory), name=str(directory / export.CONFIG_FILE))


def build_penalty(cfg: Any) -> LatentPenalty:
    """The latent penalty an experiment describes; its critic, if any, is freshly initialised."""
    kind = cfg.penalty.kind
    return PENALTIES[kind](getattr(cfg.penalty, kind), build_prior(cfg), cfg.model.encoder)
