"""The experiment's schema: the sections of ``config/schema.py`` with one options section for each network and
penalty, listed here by name (their builders are listed under the same names in ``registry.py``).

Nothing here imports torch, so that ``vegan-scale config``, and ``train`` before it loads torch, read and check a
configuration in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vegan_scale.config.fields import Requirement
from vegan_scale.config.load import load_config, load_stored, takes_text
from vegan_scale.config.schema import assemble
from vegan_scale.models.options import ConvConfig, MLPConfig, PythaeConvConfig, ResNetConfig
from vegan_scale.penalties.options import (
    GAUSSIAN,
    AdversarialConfig,
    KLConfig,
    MMDConfig,
    PenaltyTraits,
    SlicedConfig,
)
from vegan_scale.retry import Backoff

NETWORKS: dict[str, type] = {
    "conv": ConvConfig,
    "mlp": MLPConfig,
    "resnet": ResNetConfig,
    "pythae_conv": PythaeConvConfig,
}
PENALTIES: dict[str, PenaltyTraits] = {
    "mmd": PenaltyTraits(
        MMDConfig, rules=(Requirement("penalty.mmd.bandwidth", "median", "penalty.mmd.kernel", ("rbf",)),)
    ),
    "adversarial": PenaltyTraits(
        AdversarialConfig,
        trains_critic=True,
        rules=(Requirement("penalty.adversarial.p_trick", True, "prior.kind", ("gaussian",)),),
    ),
    "kl": PenaltyTraits(KLConfig, encoders=GAUSSIAN, priors=GAUSSIAN),
    "sliced": PenaltyTraits(SlicedConfig),
}


def _requirements() -> tuple[Requirement, ...]:
    """What each penalty needs of the encoder and the prior, as rules the loader checks."""
    rules = []
    for name, traits in PENALTIES.items():
        for key, allowed in (("model.encoder", traits.encoders), ("prior.kind", traits.priors)):
            if allowed is not None:
                rules.append(Requirement("penalty.kind", name, key, allowed))
        rules.extend(traits.rules)
    return tuple(rules)


ExperimentConfig = assemble(NETWORKS, {name: traits.options for name, traits in PENALTIES.items()}, _requirements())


def image_shape(cfg: Any) -> tuple[int, int, int]:
    """(C, H, W) of the experiment's images."""
    return cfg.data.channels, cfg.data.image_size, cfg.data.image_size


def stall_timeout_s(cfg: Any) -> float:
    """How long a read may go without returning a sample: data.stall_timeout_s, by default half the collective
    timeout (so that a stalled rank names its shard before its peers' collectives time out)."""
    return cfg.data.stall_timeout_s or cfg.train.collective_timeout_s / 2


def read_retry(cfg: Any) -> Backoff:
    """How a read of the data is tried again after a transient failure (data.read_attempts tries), wherever it is
    read: the training stream, and the images read at start-up (pre-training pool, evaluation set)."""
    return Backoff(attempts=cfg.data.read_attempts)


def load_experiment(
    source: str | Path | Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    name: str = "the configuration passed in",
) -> Any:
    """The experiment in ``source`` (a YAML file, nested dicts said in errors to be ``name``, or None for the
    defaults) with ``overrides`` applied, every value and rule checked (:func:`vegan_scale.config.load.load_config`)."""
    return load_config(ExperimentConfig, source, overrides, name)


def text_key(key: str) -> bool:
    """Whether the experiment's dotted ``key`` holds text (a YAML reader keeps its values as written)."""
    return takes_text(ExperimentConfig, key)


def load_stored_experiment(path: Path) -> Any:
    """The experiment a run wrote (its config.yaml, or a checkpoint's), read as plain data
    (:func:`vegan_scale.config.load.load_stored`)."""
    return load_stored(ExperimentConfig, path)
