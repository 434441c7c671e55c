"""Validation of an experiment, run by the loader, so that every command refuses the same configurations.

Per key: a string among its choices, a number within its range (every element, for a list), checked after each
source is merged so that the error names the file or override that brought the value. Across keys: the rules
below, and the :class:`~vegan_scale.config.fields.Requirement` list the schema carries (the registry adds the
penalties' own requirements when it assembles the schema).
"""

from __future__ import annotations

import itertools
import posixpath
import re
from typing import Any

from vegan_scale.config.fields import leaves, type_name
from vegan_scale.errors import ConfigError


def check_values(schema: type, obj: Any, where: str = "") -> None:
    """Every leaf of ``obj`` (a schema instance or an OmegaConf tree of it) within its choices and range, its
    integers within 64 bits (steps and seeds become int64 tensors), and the entries of a text mapping text."""
    for key, field, _ in leaves(schema):
        value = lookup(obj, key)
        choices, bounds = field.metadata.get("choices"), field.metadata.get("bounds")
        if choices and value not in choices:
            raise ConfigError(f"{where}{key}={value!r} is not one of {', '.join(choices)}")
        if type_name(field) == "dict[str, str]":
            for name, entry in value.items():
                if not isinstance(entry, (str, int, float, bool)):
                    raise ConfigError(f"{where}{key}.{name} must be text, not a mapping or a list")
        if bounds is None or value is None:
            continue
        numbers = [value] if isinstance(value, (int, float)) else list(value)  # a list: every element
        if any(isinstance(n, int) and not -(2**63) <= n < 2**63 for n in numbers):
            raise ConfigError(f"{where}{key} holds an integer of more than 64 bits: it must be {bounds}")
        if not all(bounds.contains(n) for n in numbers):
            shown = value if isinstance(value, (int, float)) else numbers
            raise ConfigError(f"{where}{key}={shown} is out of range: it must be {bounds}")


YAML_BOOLEANS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def restore_words(schema: type, data: dict, where: str = "") -> None:
    """Put back the word YAML took for a boolean where the key's choices are words: YAML 1.1 reads ``no``, ``off``,
    ``yes`` and ``on`` as booleans, so ``train.mixed_precision=no`` (accelerate's spelling) would arrive as False.
    Refuse a number other than 0 or 1 for a boolean key, which OmegaConf takes for true (``train.deterministic=10``,
    or ``=-1``)."""
    for key, field, _ in leaves(schema):
        *parents, leaf = key.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        choices, value = field.metadata.get("choices") or (), node.get(leaf)
        if isinstance(value, bool):
            words = [word for word in YAML_BOOLEANS[value] if word in choices]
            node[leaf] = words[0] if words else value
        elif type_name(field).startswith("bool") and isinstance(value, int) and value not in (0, 1):
            raise ConfigError(f"{where}{key}={value} is not a boolean: write true or false")


# A name that becomes one directory: no separator, no "..", no hidden file, within every file system's limit.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def check_experiment(obj: Any) -> None:
    """Rules that span several keys; the values themselves were checked as they were merged."""
    for key in ("run.experiment", "run.name"):  # the run directory is <run.root>/<run.experiment>/<run.name>
        name = lookup(obj, key)
        if name is not None and not NAME.fullmatch(name):
            raise ConfigError(
                f"{key}={name!r} must be one directory name: letters, digits, '.', '_' or '-', starting with a letter "
                "or digit, at most 200 characters (the run directory is <run.root>/<run.experiment>/<run.name>)"
            )
    resume = obj.train.resume
    if resume not in ("auto", "never") and resume.strip().lower() in ("auto", "never", ""):
        raise ConfigError(
            f"train.resume={resume!r} would be read as the path of a checkpoint: write auto or never (lowercase, "
            "no spaces), or a checkpoint directory's path (…/checkpoints/step_N)"
        )
    o = obj.optim
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, Adam's beta1 and beta2 (got {list(o.betas)})")
    milestones = list(o.lr_milestones)
    if len(milestones) != len(o.lr_factors) or any(a >= b for a, b in itertools.pairwise(milestones)):
        raise ConfigError(
            "optim.lr_milestones must be increasing and as long as optim.lr_factors "
            f"(got {list(o.lr_milestones)} and {list(o.lr_factors)})"
        )
    if obj.data.stall_timeout_s is not None and obj.data.stall_timeout_s >= obj.train.collective_timeout_s:
        raise ConfigError(
            f"data.stall_timeout_s={obj.data.stall_timeout_s:g} must be below train.collective_timeout_s="
            f"{obj.train.collective_timeout_s:g}: a rank stalled on data must give up before the others give up on it"
        )
    _check_tracking_names(obj.tracking)
    _check_sampling(obj.data)
    check_batch(obj, obj.train.global_batch_size, 1)  # the most a micro-step can hold, whatever the processes
    network = getattr(obj.model, obj.model.network, None)  # its options, which say what images it takes
    if hasattr(network, "refuses") and (why := network.refuses(obj.data.image_size)):
        raise ConfigError(f"model.network={obj.model.network} {why} (data.image_size={obj.data.image_size})")
    for rule in getattr(type(obj), "REQUIREMENTS", ()):
        if lookup(obj, rule.when) == rule.value and lookup(obj, rule.needs) not in rule.allowed:
            raise ConfigError(
                f"{rule.when}={_word(rule.value)} needs {rule.needs}={'|'.join(map(_word, rule.allowed))} "
                f"(got {rule.needs}={_word(lookup(obj, rule.needs))})"
            )


def check_batch(obj: Any, micro: int, processes: int) -> None:
    """The penalty's rule on the batch as it is shared (micro-batches of ``micro`` samples on each of ``processes``
    processes), if it has one: the MMD's estimate needs two codes."""
    options = getattr(obj.penalty, obj.penalty.kind, None)
    if hasattr(options, "too_few") and (why := options.too_few(micro, processes)):
        t = obj.train
        over = f", over {processes} processes" if processes > 1 else ""
        cap = f" or train.micro_batch_size (now {t.micro_batch_size})" if t.micro_batch_size is not None else ""
        raise ConfigError(
            f"penalty.kind={obj.penalty.kind} {why}: raise train.global_batch_size (now {t.global_batch_size}{over})"
            f"{cap}"
        )


def _check_sampling(data: Any) -> None:
    """The resampled mode's settings, given only with it: the training read silently past an epoch size, and
    refused a weight list that matched no source only once it had started."""
    sources = len([part for part in data.train.split("::") if part.strip()])
    for key, value in (("data.train_weights", data.train_weights), ("data.epoch_samples", data.epoch_samples)):
        if value is not None and data.mode != "resampled":
            raise ConfigError(f"{key} is set, and applies to data.mode=resampled only (epoch mode reads every sample "
                              f"once): set data.mode=resampled, or {key}=null")  # fmt: skip
    if data.train_weights is not None and len(data.train_weights) != sources:
        raise ConfigError(
            f"data.train_weights holds {len(data.train_weights)} weight(s) for the {sources} source(s) of data.train "
            "(joined by '::'): give one per source, or null to weigh them equally"
        )


# MLflow's rules for a tag key (letters, digits, '_', '-', '.', ' ', ':', '/'; a path that stays itself) and a tag is
# also logged as the param tracking.tags.<key>, of at most 250 characters. Refused at load: MLflow refused the run at
# its opening, after the run had started, and `vegan-scale sync` could not mend it.
TAG_KEY = re.compile(r"[\w.\- :/]{1,236}")


def _check_tracking_names(tracking: Any) -> None:
    for key in tracking.tags:
        if not TAG_KEY.fullmatch(key) or not _stays_itself(key):
            raise ConfigError(
                f"tracking.tags.{key[:60]}: an MLflow tag key is at most 236 characters of letters, digits, '_', '-', "
                "'.', ' ', ':' and '/', and no path that leads elsewhere ('..', a leading '/')"
            )
    name = tracking.register_as
    if name is not None and (not name.strip() or "/" in name or ":" in name or not _stays_itself(name)):
        raise ConfigError(
            f"tracking.register_as={name!r} is no MLflow model name: not blank, without '/' or ':' (MLflow's rule)"
        )
    if tracking.experiment is not None and not tracking.experiment.strip():
        raise ConfigError("tracking.experiment is blank: name the MLflow experiment, or write null for the default")


def _stays_itself(name: str) -> bool:
    """Whether ``name``, read as a path, is itself (MLflow stores names as paths in places)."""
    norm = posixpath.normpath(name)
    return norm == name and norm != "." and not norm.startswith(("..", "/"))


def lookup(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _word(value: Any) -> str:
    """A value as it is written in a config (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
