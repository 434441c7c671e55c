"""The configuration loader, the assembled schema and the CLI's handling of configs, against hand-written recipes."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT
from vegan_scale import experiment, registry
from vegan_scale.config.fields import Range, describe, leaves
from vegan_scale.config.load import to_yaml
from vegan_scale.config.yaml_file import read_yaml
from vegan_scale.errors import ConfigError
from vegan_scale.experiment import ExperimentConfig, load_experiment

MNIST = ROOT / "configs" / "mnist"


def alias_bomb(section: str) -> str:
    """About 600 bytes of YAML whose ``section`` stands for 10**10 values: ten nested aliases of ten (the "billion
    laughs"). Every node counted: the mapping, its key, the section's mapping, its 10 keys, and lists a_i of
    1 + 10 S_(i-1) nodes (S_0 = 11): 12,345,679,023."""
    lists = [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else 'x'] * 10)}]" for i in range(10)]
    return "\n".join([f"{section}:", *lists, ""])


def load(path: str | Path | None, *overrides: str):
    return load_experiment(path, list(overrides))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(path: str | Path | None, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, *overrides)
    return str(info.value)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        elif not isinstance(value, dict):
            out[f"{prefix}{key}"] = value
    return out


# The WAE-MMD MNIST recipe as the paper's appendix states it; other recipes are differences from it.
WAE_MMD = {
    "run.experiment": "mnist",
    "data.train": ".data/shards/mnist/train",
    "data.test": ".data/shards/mnist/test",
    "data.image_size": 28,
    "data.channels": 1,
    "model.latent_dim": 8,
    "model.network": "conv",
    "model.encoder": "deterministic",
    "model.decoder": "deterministic",
    "model.conv.width": 128,
    "prior.kind": "gaussian",
    "prior.scale": 1.0,
    "cost.kind": "l2sq",
    "penalty.kind": "mmd",
    "penalty.weight": 10.0,
    "penalty.mmd.kernel": "imq",
    "optim.lr": 1e-3,
    "optim.betas": [0.5, 0.999],
    "optim.lr_milestones": [30.0, 50.0],
    "optim.lr_factors": [0.5, 0.1],  # the official code: / 2 at epoch 30, / 5 again at epoch 50
    "train.global_batch_size": 100,
    "train.epochs": 100.0,
    "train.max_steps": None,
    # the official MNIST config's stabilisers
    "model.input_noise": 0.01,
    "model.init_std": 0.0099999,
    "train.encoder_pretrain_steps": 200,
    "train.encoder_pretrain_batch": 1000,
}
RECIPES = {
    "wae_mmd": WAE_MMD,
    "wae_gan": WAE_MMD
    | {
        "penalty.kind": "adversarial",
        "penalty.weight": 10.0,
        "penalty.adversarial.hidden": 512,
        "penalty.adversarial.layers": 4,
        "penalty.adversarial.lr": 5e-4,
        "penalty.adversarial.init_std": 0.0099999,
        "penalty.adversarial.reencode": True,
        "penalty.adversarial.p_trick": False,
    },
    "aae": WAE_MMD
    | {"penalty.kind": "adversarial", "model.encoder": "gaussian", "penalty.weight": 1.0, "cost.kind": "l2sq"},
    "vae": WAE_MMD
    | {"penalty.kind": "kl", "penalty.weight": 1.0, "cost.kind": "bernoulli", "model.encoder": "gaussian"}
    | {"model.input_noise": 0.0, "model.init_std": None, "train.encoder_pretrain_steps": 0},
    "swae": WAE_MMD | {"penalty.kind": "sliced", "penalty.sliced.projections": 50, "penalty.sliced.p": 2.0},
    "quickstart": WAE_MMD
    | {"model.conv.width": 16, "train.max_steps": 1500, "eval.every_steps": 500, "checkpoint.every_steps": 500},
}


def test_every_mnist_config_is_covered():
    """Every file in configs/mnist has a hand-written expected recipe below (a new file needs one)."""
    assert {p.stem for p in MNIST.glob("*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_mnist_config_resolves_to_documented_recipe(name):
    """configs/mnist/<name>.yaml resolves to the recipe its comment and the papers describe."""
    values = flatten(dataclasses.asdict(load(MNIST / f"{name}.yaml")))
    assert {key: values[key] for key in RECIPES[name]} == RECIPES[name]


FASHION = {"run.experiment": "fashion_mnist", "data.train": ".data/shards/fashion_mnist/train"}
FASHION |= {"data.test": ".data/shards/fashion_mnist/test"}
REDUCED = {"model.conv.width": 16, "train.epochs": 3.0, "optim.lr_milestones": [0.9, 1.5]}
REDUCED |= {"eval.every_steps": 150, "checkpoint.every_steps": 750}
DERIVED = sorted(name for name in RECIPES if name != "quickstart")
# docs/results.md, "Choosing WAE-GAN's weight": what the validation study chose for the test tables
CHOSEN_ON_VALIDATION = {"wae_gan": {"penalty.weight_schedule": "adaptive", "penalty.adaptive_every": 300}}


@pytest.mark.parametrize("name", DERIVED)
def test_fashion_and_results_configs_differ_from_the_mnist_recipe_only_as_documented(name):
    """configs/fashion_mnist/<name>.yaml is the MNIST recipe on other data; configs/results/<data>/<name>.yaml is
    that recipe reduced (configs/results/reduced.yaml) under a fixed run name, with what the validation study chose,
    and nothing else differs."""
    mnist = flatten(dataclasses.asdict(load(MNIST / f"{name}.yaml")))
    cases = [
        (MNIST.parent / "fashion_mnist" / f"{name}.yaml", FASHION),
        (MNIST.parent / "results" / "mnist" / f"{name}.yaml", REDUCED | {"run.experiment": "results_mnist"}),
        (MNIST.parent / "results" / "fashion_mnist" / f"{name}.yaml", FASHION | REDUCED),
    ]
    for path, changes in cases:
        values = flatten(dataclasses.asdict(load(path)))
        if "results" in path.parts:  # on the split that holds out a validation set (split.yaml)
            data = path.parent.name
            split = {"data.train": f".data/shards/{data}_val/train", "data.test": f".data/shards/{data}_val/test"}
            changes = changes | split | {"run.name": name, "run.experiment": f"results_{data}"}
            changes |= CHOSEN_ON_VALIDATION.get(name, {})
        assert {k: v for k, v in values.items() if mnist[k] != v} == changes, path


def test_schema_defaults_without_a_file():
    """With no file and no override the result is the schema's own defaults (the dataclass constructor)."""
    assert load(None) == ExperimentConfig()
    assert load(None, "model.latent_dim=3").model.latent_dim == 3


def test_precedence_schema_parents_file_overrides(tmp_path):
    """schema < grandparent < parent < file < override, with relative inherit paths resolved per file."""
    write(tmp_path / "base" / "grand.yaml", "model: {latent_dim: 1}\ntrain: {epochs: 1}\noptim: {lr: 0.1}\n")
    write(tmp_path / "mid" / "parent.yaml", "inherit: ../base/grand.yaml\ntrain: {epochs: 2}\noptim: {lr: 0.2}\n")
    child = write(tmp_path / "exp" / "child.yaml", "inherit: ../mid/parent.yaml\noptim: {lr: 0.3}\n")
    cfg = load(child, "train.max_steps=7")
    assert cfg.model.latent_dim == 1  # only the grandparent sets it
    assert cfg.train.epochs == 2.0  # parent beats grandparent
    assert cfg.optim.lr == 0.3  # file beats parents
    assert cfg.train.max_steps == 7  # override beats everything
    assert cfg.train.global_batch_size == 100  # nobody sets it: schema default
    assert load(child, "optim.lr=0.4").optim.lr == 0.4


def test_inherit_list_later_parent_wins(tmp_path):
    """With several parents they merge in order, so the later one wins a key both set."""
    write(tmp_path / "a.yaml", "model: {latent_dim: 1, noise_dim: 5}\n")
    write(tmp_path / "b.yaml", "model: {latent_dim: 2}\n")
    cfg = load(write(tmp_path / "c.yaml", "inherit: [a.yaml, b.yaml]\n"))
    assert (cfg.model.latent_dim, cfg.model.noise_dim) == (2, 5)


def test_yaml_values_are_converted_to_schema_types(tmp_path):
    """PyYAML reads `1e-3` as a string and `100` as an int; the schema turns them into the float fields' values."""
    cfg = load(write(tmp_path / "x.yaml", "optim: {lr: 1e-3}\ntrain: {epochs: 100}\n"))
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 100.0 and isinstance(cfg.train.epochs, float)


def test_override_values_lists_and_null():
    """Overrides parse lists, null and booleans as YAML does."""
    cfg = load(MNIST / "quickstart.yaml", "optim.betas=[0.9,0.99]", "train.max_steps=null", "train.deterministic=true")
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.train.max_steps is None
    assert cfg.train.deterministic is True


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("model.conv.widht=3", "model.conv.widht", "model.conv.width"),
        ("penalty.mmd.kernal=rbf", "penalty.mmd.kernal", "penalty.mmd.kernel"),
        ("optim.beta=[0.5,0.9]", "optim.beta", "optim.betas"),
        ("train.batch_size=32", "train.batch_size", "train.global_batch_size"),  # was train.micro_batch_size
        ("data.batch_size=32", "data.batch_size", "train.global_batch_size"),  # was data.image_size
        ("train.lr=0.1", "train.lr", "optim.lr"),  # was train
        ("optim.learning_rate=0.1", "optim.learning_rate", "optim.lr"),  # was optim.lr_factors
        ("penalty.lambda=5", "penalty.lambda", "penalty.weight"),  # was penalty.mmd
        ("lr=0.1", "lr", "optim.lr"),  # was none
        ("train.seed=3", "train.seed", "run.seed"),
    ],
)
def test_unknown_override_key_names_it_and_suggests(override, key, hint):
    """A misspelt key is refused with the override, the full dotted key and the key meant: its namesake in another
    section, or what other trainers and the papers call it, before a close spelling (following the hint for
    `train.batch_size`, a micro-batch cap, left the batch unchanged without a word)."""
    msg = config_error(MNIST / "wae_mmd.yaml", override)
    assert repr(override) in msg
    assert f"'{key}'" in msg
    assert f"did you mean '{hint}'" in msg


def test_a_dotted_key_in_a_file_is_shown_nested(tmp_path):
    """An override's dotted key pasted into a file was refused with "did you mean" the same key."""
    path = write(tmp_path / "dotted.yaml", "penalty.mmd.kernel: rbf\n")
    msg = config_error(path)
    assert "unknown key 'penalty.mmd.kernel'; a file nests keys: write penalty: {mmd: {kernel: VALUE}}" in msg
    assert "did you mean" not in msg


def test_unknown_key_in_file_names_the_file(tmp_path):
    """A misspelt key inside an inherited YAML file is reported with that file's path, not the child's."""
    parent = write(tmp_path / "parent.yaml", "model:\n  conv:\n    widht: 3\n")
    child = write(tmp_path / "child.yaml", "inherit: parent.yaml\n")
    msg = config_error(child)
    assert str(parent) in msg
    assert "'model.conv.widht'" in msg and "'model.conv.width'" in msg


@pytest.mark.parametrize(
    ("override", "key"), [("train.max_steps=abc", "train.max_steps"), ("optim.lr=fast", "optim.lr")]
)
def test_wrong_type_names_override_and_key(override, key):
    """A value of the wrong type is refused naming the override and the dotted key."""
    msg = config_error(MNIST / "wae_mmd.yaml", override)
    assert repr(override) in msg and key in msg


def test_wrong_type_in_file_names_the_file(tmp_path):
    """A value of the wrong type inside a file names that file and the dotted key."""
    path = write(tmp_path / "bad.yaml", "model:\n  latent_dim: eight\n")
    msg = config_error(path)
    assert str(path) in msg and "model.latent_dim" in msg


def test_yaml_boolean_words_stay_words(tmp_path):
    """YAML 1.1 reads `no` as false; where the key's choices are words (accelerate's `mixed_precision=no`) the word
    is kept, in an override and in a file."""
    assert (
        load(MNIST / "wae_mmd.yaml", "train.mixed_precision=bf16", "train.mixed_precision=no").train.mixed_precision
        == "no"
    )
    path = write(tmp_path / "no.yaml", f"inherit: {MNIST / 'wae_mmd.yaml'}\ntrain:\n  mixed_precision: no\n")
    assert load(path).train.mixed_precision == "no"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.low_precision_weights=true"], "needs train.mixed_precision=bf16 (got train.mixed_precision=no)"),
        (
            ["train.low_precision_weights=true", "train.mixed_precision=bf16", "train.compile=true"],
            "train.low_precision_weights=true needs train.compile=false (got train.compile=true)",
        ),
    ],
)
def test_low_precision_weights_requirements(overrides, message):
    """The bf16 weights copy needs bf16 autocast and no torch.compile (it would compile the float32 master)."""
    assert message in config_error(MNIST / "wae_mmd.yaml", *overrides)


def test_bad_choice_override_lists_choices():
    """A value outside a key's choices names the override and the key and lists every allowed value."""
    msg = config_error(MNIST / "wae_mmd.yaml", "penalty.kind=foo")
    assert "'penalty.kind=foo'" in msg and "penalty.kind" in msg
    for choice in ("mmd", "adversarial", "kl", "sliced"):
        assert choice in msg


def test_bad_choice_in_file_names_the_file(tmp_path):
    """A value outside a key's choices inside a file names that file."""
    path = write(tmp_path / "bad.yaml", "inherit: " + str(MNIST / "wae_mmd.yaml") + "\ncost:\n  kind: l3\n")
    msg = config_error(path)
    assert str(path) in msg and "cost.kind" in msg and "bernoulli" in msg


@pytest.mark.parametrize("override", ["train.max_steps", "--train.max_steps=3", "-x=1", "=3"])
def test_malformed_override(override):
    """An override without `key=` or with leading dashes is refused with the expected form."""
    msg = config_error(None, override)
    assert repr(override) in msg and "key.sub=value" in msg


def test_missing_file(tmp_path):
    """A missing experiment file is named, with where configs live."""
    msg = config_error(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in msg and "configs/" in msg


def test_missing_parent_names_the_inheriting_file(tmp_path):
    """A missing parent is named together with the file that inherits it."""
    child = write(tmp_path / "child.yaml", "inherit: gone.yaml\n")
    msg = config_error(child)
    assert str(tmp_path / "gone.yaml") in msg and str(child) in msg


def test_circular_inherit(tmp_path):
    """a -> b -> a is refused and the cycle is shown; so is a file inheriting itself."""
    a = write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    write(tmp_path / "b.yaml", "inherit: a.yaml\n")
    msg = config_error(a)
    assert "circular" in msg and str(tmp_path / "b.yaml") in msg
    assert "circular" in config_error(write(tmp_path / "self.yaml", "inherit: self.yaml\n"))


def test_diamond_inherit_is_not_circular(tmp_path):
    """Two parents sharing a grandparent is not a cycle."""
    write(tmp_path / "g.yaml", "model: {latent_dim: 4}\n")
    write(tmp_path / "p1.yaml", "inherit: g.yaml\n")
    write(tmp_path / "p2.yaml", "inherit: g.yaml\nmodel: {noise_dim: 3}\n")
    cfg = load(write(tmp_path / "c.yaml", "inherit: [p1.yaml, p2.yaml]\n"))
    assert (cfg.model.latent_dim, cfg.model.noise_dim) == (4, 3)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model: [unclosed\n", "not valid YAML at line 2, column 1: expected ',' or ']'"),
        ("train:\n\tmax_steps: 3\n", "not valid YAML at line 2, column 1: found character '\\t'"),
        (
            "train:\n  max_steps: [1, 2\nmodel: {}\n",
            "line 3, column 6: expected ',' or ']', but got ':' (while parsing a flow sequence at line 2, column 14)",
        ),
        ("- a\n- b\n", "mapping"),
        ("inherit:\nmodel: {latent_dim: 3}\n", None),
        ("inherit: 3\n", "inherit"),
        ("inherit: [3]\n", "inherit"),
        (
            "model: {latent_dim: 3}\nmodel: {latent_dim: 4}\n",
            "key 'model' is written twice in one mapping (lines 1 and 2)",
        ),
        (
            "model:\n  latent_dim: 3\n  latent_dim: 4\n",
            "key 'latent_dim' is written twice in one mapping (lines 2 and 3)",
        ),
    ],
)
def test_malformed_file(tmp_path, text, words):
    """Invalid YAML (said on one line with its place), a non-mapping, a malformed inherit or a key written twice (YAML
    keeps the last without a word) is a ConfigError naming the file; an empty inherit is none."""
    path = write(tmp_path / "bad.yaml", text)
    if words is None:
        assert load(path).model.latent_dim == 3
        return
    msg = config_error(path)
    assert str(path) in msg and words in msg


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (alias_bomb("model"), "12,345,679,023 values with its aliases"),
        ("run: &a\n  name: *a\n", "refers to a value that contains it"),  # a value inside itself
        ("run: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested more deeply"),
        (bytes(range(256)) * 4, "not valid YAML"),  # a binary file named by mistake
        (b"#" * (5 << 20), "larger than 4 MiB"),  # a shard named by mistake: refused unread
    ],
    ids=["alias-bomb", "self-reference", "deep", "binary", "large"],
)
def test_a_file_that_is_not_a_configuration_is_refused_at_once(tmp_path, content, words):
    """Files from colleagues and shared storage that would make the loader hang, exhaust memory or crash are
    ConfigErrors naming the file."""
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    msg = config_error(path)
    assert str(path) in msg and words in msg


def test_aliases_that_stay_small_are_allowed(tmp_path):
    """Anchors, aliases and merge keys that stand for little are plain YAML: the file loads as written out."""
    text = "optim: {lr: &lr 0.0003}\ntrain: {max_steps: 7, global_batch_size: 50}\neval: {every_steps: 7}\n"
    aliased = write(tmp_path / "a.yaml", text + "penalty:\n  adversarial: {lr: *lr}\n")
    written = write(tmp_path / "w.yaml", text + "penalty:\n  adversarial: {lr: 0.0003}\n")
    assert load(aliased) == load(written) and load(aliased).penalty.adversarial.lr == 0.0003


@pytest.mark.parametrize(
    "override",
    ["run.name=../../elsewhere", "run.name=a/b", "run.name=.hidden", f"run.name={'x' * 201}", "run.experiment=../x"],
)
def test_a_run_name_is_one_directory_name(override):
    """run.experiment and run.name each become one directory under run.root: a separator, "..", a hidden name or
    one longer than file systems allow is refused (a run placed elsewhere would also miss its MLflow store)."""
    msg = config_error(MNIST / "wae_mmd.yaml", override)
    assert f"{override.split('=')[0]}=" in msg and "one directory name" in msg
    assert load(MNIST / "wae_mmd.yaml", "run.name=g-wae_gan-seed0-lr0.001", "run.experiment=results_mnist")


@pytest.mark.parametrize("value", ["AUTO", "Never", "auto ", "''"])
def test_a_resume_word_misspelt_is_not_taken_for_a_path(value: str) -> None:
    """train.resume=AUTO was taken for the path of a checkpoint directory named AUTO: refused at the config's
    check, saying the words and the path it takes."""
    msg = config_error(MNIST / "wae_mmd.yaml", f"train.resume={value}")
    assert "would be read as the path of a checkpoint: write auto or never" in msg
    assert load(MNIST / "wae_mmd.yaml", "train.resume=runs/x/checkpoints/step_10").train.resume.endswith("step_10")


def test_newer_schema_version_refused(tmp_path):
    """A config from a newer schema is refused rather than half-understood."""
    assert "newer" in config_error(None, "schema_version=99")


def test_describe_lists_every_leaf_with_a_doc():
    """describe() covers exactly the leaves of dataclasses.asdict(ExperimentConfig()), each documented."""
    rows = describe(ExperimentConfig)
    leaves = flatten(dataclasses.asdict(ExperimentConfig()))
    assert len({row[0] for row in rows}) == len(rows)  # no key listed twice
    mappings = {row[0] for row in rows if row[2] == {}}  # a mapping key (tracking.tags) is empty by default
    assert {row[0] for row in rows} == set(leaves) | mappings
    for key, type_name, default, doc, choices in rows:
        assert doc.strip(), f"{key} has no documentation"
        assert type_name, key
        assert default == leaves.get(key, {}), key
        if choices:
            assert default in choices, key
    keys = {row[0] for row in rows}
    assert {"model.conv.width", "penalty.mmd.kernel", "penalty.adversarial.lr", "train.max_steps"} <= keys


def test_every_section_documented():
    """Every field of every dataclass in the schema, sections included, has a non-empty doc in its metadata."""

    def walk(cls: type, prefix: str):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc", "").strip(), f"{prefix}{f.name} has no documentation"
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")

    walk(ExperimentConfig, "")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_to_yaml_round_trip(tmp_path, name):
    """to_yaml's output is plain YAML equal to dataclasses.asdict, and re-loads to an equal config."""
    cfg = load(MNIST / f"{name}.yaml", "run.name=x", "optim.betas=[0.9,0.95]")
    text = to_yaml(cfg)
    assert yaml.safe_load(text) == dataclasses.asdict(cfg)
    assert load(write(tmp_path / "resolved.yaml", text)) == cfg


# --- the command line (subprocesses; each costs a Python start) ---


def cli(*args: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``vegan-scale ARGS`` in a new process (``python``: the interpreter's own options)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    command = [sys.executable, *python, "-m", "vegan_scale", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def assert_usage_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2 (usage), a message naming every one of ``words``, and no traceback."""
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    assert "Traceback" not in result.stderr


def test_cli_train_unknown_key_exits_2():
    """`train` with a misspelt override exits 2 (usage) and the message names the key and the fix."""
    result = cli("train", "configs/mnist/wae_mmd.yaml", "model.conv.widht=3")
    assert_usage_error(result, "model.conv.widht", "model.conv.width")


@pytest.mark.parametrize("command", ["train", "config"])
def test_a_bad_configuration_is_named_before_torch_loads(command):
    """The schema, every network's and penalty's options included, is torch-free: `train` and `config` name a
    misspelt key without importing torch (which took 3 of the 3.5 s such an error took before)."""
    result = cli(command, "configs/mnist/wae_mmd.yaml", "model.mlp.hiden=[8]", python=("-X", "importtime"))
    lines = result.stderr.splitlines()
    imported = {line.rpartition("|")[2].strip() for line in lines if line.startswith("import time")}
    assert "vegan_scale.experiment" in imported and "vegan_scale.penalties.options" in imported
    assert "torch" not in imported
    assert result.returncode == 2 and "model.mlp.hidden" in lines[-1]


def test_every_listed_network_and_penalty_has_a_builder():
    """The networks and penalties the schema lists (experiment.py) are those the registry builds, by name."""
    assert registry.NETWORKS.keys() == experiment.NETWORKS.keys()
    assert registry.PENALTIES.keys() == experiment.PENALTIES.keys()


def test_cli_train_refuses_an_alias_bomb_at_once(tmp_path):
    """The bomb from the command line: exit 2 naming the file, no traceback (before, the loader expanded it for
    as long as memory lasted)."""
    result = cli("train", str(write(tmp_path / "bomb.yaml", alias_bomb("model"))))
    assert_usage_error(result, "bomb.yaml", "aliases")


def test_cli_train_wrong_type_exits_2():
    """`train` with a value of the wrong type exits 2 and names the key."""
    assert_usage_error(cli("train", "configs/mnist/wae_mmd.yaml", "train.max_steps=abc"), "train.max_steps")


def test_cli_train_missing_data_exits_2(tmp_path):
    """`train` with no shards at data.train exits 2 and says how to write them."""
    result = cli(
        "train",
        "configs/mnist/quickstart.yaml",
        "data.train=/nonexistent",
        "tracking.backend=none",
        f"run.root={tmp_path}",
    )
    assert_usage_error(result, "/nonexistent", "vegan-scale shards")


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("penalty.kind=kl", ["penalty.kind=kl", "model.encoder"]),  # the VAE's KL needs a Gaussian encoder
        ("train.epochs=0", ["train.epochs", "(0, 1e+12]"]),
        ("optim.lr_milestones=[30]", ["optim.lr_milestones", "optim.lr_factors"]),
    ],
)
def test_config_refuses_what_train_refuses(override, words, tmp_path):
    """`config` and `train` refuse the same experiments, with the same message, before any run directory exists."""
    refused = [
        cli("config", "configs/mnist/quickstart.yaml", override),
        cli("train", "configs/mnist/quickstart.yaml", override, f"run.root={tmp_path}", "tracking.backend=none"),
    ]
    for result in refused:
        assert_usage_error(result, *words)
    assert refused[0].stderr == refused[1].stderr
    assert not any(tmp_path.iterdir())


def test_cli_config_prints_resolved_yaml():
    """`config FILE` prints YAML that parses to the recipe (WAE-GAN: adversarial penalty, lambda 10)."""
    result = cli("config", "configs/mnist/wae_gan.yaml", "train.max_steps=5")
    assert result.returncode == 0, result.stderr
    assert "kind: adversarial" in result.stdout
    printed = yaml.safe_load(result.stdout)
    assert printed["penalty"]["kind"] == "adversarial" and printed["penalty"]["weight"] == 10.0
    assert printed["train"]["max_steps"] == 5


def test_cli_config_describe_lists_every_key():
    """`config --describe` prints one line per leaf key, each with its documentation."""
    result = cli("config", "--describe")
    assert result.returncode == 0, result.stderr
    lines = {line.split(" ", 1)[0]: line for line in result.stdout.splitlines()}
    for key, _, _, doc, choices in describe(ExperimentConfig):
        assert key in lines and doc in lines[key]
        if choices:
            assert "|".join(choices) in lines[key]


def test_describe_with_a_configuration_is_a_usage_error():
    """`config FILE --describe` listed the schema and ignored the file and its overrides without a word."""
    assert_usage_error(cli("config", "configs/mnist/wae_mmd.yaml", "--describe"), "--describe and --reference")
    assert_usage_error(cli("config", "--reference", "train.max_steps=3"), "leave out the file and overrides")


def test_every_numeric_key_has_a_range():
    """Every int and float key (lists and optional ones too) states the numbers it allows, and its default is one."""
    for key, field, default in leaves(ExperimentConfig):
        if "int" not in str(field.type) and "float" not in str(field.type):
            continue
        bounds = field.metadata.get("bounds")
        assert isinstance(bounds, Range), f"{key} ({field.type}) has no range"
        values = [] if default is None else default if isinstance(default, list) else [default]
        assert all(bounds.contains(v) for v in values), key


@pytest.mark.parametrize(
    ("override", "rule"),
    [
        ("optim.lr=nan", "[0, 3.40282e+38]"),
        ("optim.lr=inf", "[0, 3.40282e+38]"),
        ("optim.lr=-0.001", "[0, 3.40282e+38]"),
        ("train.micro_batch_size=-10", ">= 1"),
        ("penalty.weight=-10", "[0, 3.40282e+38]"),
        ("optim.weight_decay=-1", ">= 0"),
        ("model.conv.width=0", ">= 1"),
        ("prior.scale=-1", "[1.17549e-38, "),
        ("data.num_workers=-1", ">= 0"),
        ("checkpoint.every_steps=-1", ">= 0"),
        ("optim.betas=[0.5,1.5]", "[0, 1)"),
        ("data.stall_timeout_s=900", "train.collective_timeout_s"),
        ("run.seed=4294967296", "[0, 4294967295]"),  # torch's CPU generator would run seed 0 again
        ("train.collective_timeout_s=1e14", "(0, 1000000000]"),  # timedelta's OverflowError at the start
        ("tracking.close_timeout_s=1e300", "(0, 1000000000]"),
        ("prior.scale=1e39", "[1.17549e-38, 3.40282e+38]"),  # inf in float32: a RuntimeError in the kernel's sums
        ("model.input_noise=1e39", "[0, 3.40282e+38]"),
        ("cost.scale=1e-300", "[1.17549e-38, 3.40282e+38]"),  # 0 in float32: trained without its cost, exit 0
        ("penalty.adversarial.init_std=1e39", "[1.17549e-38, 3.40282e+38]"),  # NaN at the first step (65)
        ("penalty.weight=1e39", "[0, 3.40282e+38]"),
        ("optim.lr=1e39", "[0, 3.40282e+38]"),
        ("train.epochs=1e308", "(0, 1e+12]"),  # an OverflowError counting the steps, even beside max_steps
        ("eval.num_samples=1", ">= 2"),  # the latent MMD failed at the first evaluation, after training
        ("train.global_batch_size=1", "needs at least 2 codes per estimate"),  # the MMD failed at the first step
        ("train.deterministic=10", "is not a boolean: write true or false"),  # OmegaConf took it for true
        ("train.channels_last=-1", "is not a boolean: write true or false"),
    ],
)
def test_values_out_of_range_name_the_key(override, rule):
    """A value outside its documented range is refused at load, naming the override, the key and the range."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load(MNIST / "wae_mmd.yaml", override)
    assert key in str(info.value) and rule in str(info.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.max_steps=1" + "0" * 400, "more than 64 bits"),  # float() of it overflowed
        ("run.seed=" + "9" * 30, "more than 64 bits"),
        ("train.max_steps=${nowhere}", "nowhere"),
        ("train.max_steps=${train.max_steps}", "train.max_steps"),  # refers to itself
        ("run.name=${oc.env:VEGAN_SCALE_TEST_UNSET}", "VEGAN_SCALE_TEST_UNSET"),
        ("optim.lr=${optim.betas}", "optim.lr"),
        ("optim.lr=[", "not valid YAML"),
        ("optim.betas[0]=0.9", "names joined by dots"),
        ("optim.betas.0=0.9", "names joined by dots"),
        ("train..max_steps=3", "names joined by dots"),
        ("tracking.tags.a.b=1", "tracking.tags.a must be text"),
        ("optim.betas=[0.5]", "two numbers"),
        ("optim.betas=[0.5,0.9,0.99]", "two numbers"),
        ("train.max_steps=", "write train.max_steps=null"),  # an unset shell variable must not lift the step cap
        ("run.root=", "has no value: give it a value"),  # not optional: null would be refused next
        ("optim.betas=" + "[" * 100 + "0.5" + "]" * 100, "nested more deeply"),  # OmegaConf's RecursionError
        ("optim.betas=" + "[" * 20 + "0.5" + "]" * 20, "nested more than 16 levels"),
        ("tracking.tags.t=\\${HOME}", "holds '${' once resolved"),  # read again as ${HOME} by every later load
        ("optim.lr_milestones=[30,30]", "must be increasing"),
        ("model.network=resnet", "needs a power-of-two data.image_size of at least 8 (data.image_size=28)"),
        ("model.conv.kernel_size=29", "kernel_size of at most data.image_size"),  # 1000 asked for 62 GB
        # names MLflow refuses, at the opening of the run: it trained untracked, and sync could not mend it
        ("tracking.tags." + "k" * 237 + "=1", "an MLflow tag key is at most 236 characters"),
        ("tracking.register_as=a/b:c", "is no MLflow model name"),
        ("tracking.experiment=' '", "tracking.experiment is blank"),
        ("data.epoch_samples=100", "applies to data.mode=resampled only"),  # epoch mode ignored it
        ("data.train_weights=[]", "applies to data.mode=resampled only"),
    ],
)
def test_hostile_overrides_are_one_line_errors(override, words):
    """Overrides that used to end in a traceback (OverflowError, OmegaConf's interpolation errors, YAML's scanner,
    a TypeError from merging into a list, a tag that is a mapping) or in torch's IndexError at the first step (two
    betas) are ConfigErrors naming the override; an empty value is not taken for null."""
    msg = config_error(MNIST / "wae_mmd.yaml", override)
    assert words in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train: {max_steps: 1" + "0" * 400 + "}\n", "more than 64 bits"),
        ("train: {max_steps: '${nowhere}'}\n", "nowhere"),
        ("tracking: {tags: {x: [1]}}\n", "tracking.tags.x must be text"),
        ("train: " + "{a: " * 80 + "1" + "}" * 80 + "\n", "nested more than 16 levels"),  # a RecursionError
    ],
)
def test_hostile_values_in_a_file_name_the_file(tmp_path, text, words):
    path = write(tmp_path / "bad.yaml", text)
    msg = config_error(path)
    assert str(path) in msg and words in msg


def test_a_network_that_cannot_take_the_images_is_refused_at_load():
    """pythae's pair builds 28x28 images only, the residual network halves a power-of-two side down to 4: other
    sizes passed the check and ended in torch's shape errors at the first step (or the residual network's
    ValueError as it was built)."""
    assert "takes data.image_size=28 only" in config_error(
        MNIST / "wae_mmd.yaml", "model.network=pythae_conv", "data.image_size=64"
    )
    assert "power-of-two" in config_error(MNIST / "wae_mmd.yaml", "model.network=resnet", "data.image_size=48")
    load(MNIST / "wae_mmd.yaml", "model.network=resnet", "data.image_size=32")


def test_source_weights_match_the_sources_at_load():
    """A weight list that matched no source was refused only once training had started."""
    msg = config_error(MNIST / "wae_mmd.yaml", "data.mode=resampled", "data.train_weights=[1, 2]")
    assert "holds 2 weight(s) for the 1 source(s) of data.train" in msg
    load(MNIST / "wae_mmd.yaml", "data.mode=resampled", "data.train=a::b", "data.train_weights=[1, 3]")


def test_a_tag_key_mlflow_refuses_is_refused_at_load(tmp_path):
    """A YAML key may hold what an override's may not ('?'), or name a path elsewhere ('../x')."""
    for key in ("a:b?", "../x"):
        path = write(tmp_path / "tags.yaml", yaml.safe_dump({"tracking": {"tags": {key: "x"}}}))
        assert f"tracking.tags.{key}: an MLflow tag key" in config_error(path)


def test_text_keys_take_the_override_as_typed():
    """YAML reads 010 as 8 and 0x10 as 16: run.name=010 and run.name=8 would have shared a run directory."""
    cfg = load(MNIST / "quickstart.yaml", "run.name=010", "run.experiment=0x10", "tracking.tags.x=[1]")
    assert (cfg.run.name, cfg.run.experiment, cfg.tracking.tags["x"]) == ("010", "0x10", "[1]")
    assert load(MNIST / "quickstart.yaml", "run.name='1e5'").run.name == "1e5"  # quoted: YAML's string
    assert load(MNIST / "quickstart.yaml", "run.name=null").run.name is None
    assert load(MNIST / "quickstart.yaml", "train.mixed_precision=no").train.mixed_precision == "no"


def test_text_keys_in_a_file_keep_the_text_as_written(tmp_path):
    """YAML 1.1 reads plain 010 as 8, 0x10 as 16, no as false, 1:30 as 90 and 2019-01-01 as a date: in a file, as
    on the command line, a key that holds text keeps what was written (run 010 and run 8 shared a directory).
    Numbers stay numbers, and a list stays a list (refused as a tag), in a file and in the files it inherits."""
    parent = write(tmp_path / "parent.yaml", f"inherit: {MNIST / 'quickstart.yaml'}\nrun: {{experiment: 0x10}}\n")
    child = write(
        tmp_path / "child.yaml",
        "inherit: parent.yaml\nrun: {name: 010}\ntracking: {tags: {a: no, b: 1:30, c: 1_000, d: '07', e: 2019-01-01}}\n"
        "train: {max_steps: 010}\n",
    )
    cfg = load(child)
    assert (cfg.run.name, cfg.run.experiment, cfg.train.max_steps) == ("010", "0x10", 8)
    assert cfg.tracking.tags == {"a": "no", "b": "1:30", "c": "1_000", "d": "07", "e": "2019-01-01"}
    assert parent.exists() and "tracking.tags.x must be text" in config_error(
        write(tmp_path / "list.yaml", "tracking: {tags: {x: [010]}}\n")
    )


def test_a_config_that_is_a_pipe_or_a_symlink_loop_is_refused_at_once(tmp_path):
    """A FIFO with no writer would block the reader forever; a loop of links made Path.resolve raise."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    (tmp_path / "loop1.yaml").symlink_to(tmp_path / "loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to(tmp_path / "loop1.yaml")
    assert "not a regular file" in config_error(fifo)
    assert "loop1.yaml" in config_error(tmp_path / "loop1.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_yaml(fifo)  # what sweep files and a checkpoint's config.yaml are read with


def test_a_stored_configuration_is_plain_data(tmp_path, monkeypatch):
    """A run's config.yaml is written resolved; an interpolation in one came from someone else and would have sent
    an environment variable to the tracking server (`vegan-scale sync`, `eval`)."""
    monkeypatch.setenv("VEGAN_SCALE_TEST_SECRET", "s3cr3t")
    cfg = load(MNIST / "quickstart.yaml")
    resolved = yaml.safe_load(to_yaml(cfg))
    assert experiment.load_stored_experiment(write(tmp_path / "ok.yaml", yaml.safe_dump(resolved))) == cfg
    resolved["tracking"]["uri"] = "sqlite:////tmp/${oc.env:VEGAN_SCALE_TEST_SECRET}.db"
    with pytest.raises(ConfigError, match=r"tracking\.uri") as info:
        experiment.load_stored_experiment(write(tmp_path / "config.yaml", yaml.safe_dump(resolved)))
    assert "s3cr3t" not in str(info.value)


def test_out_of_range_train_exits_2_before_making_a_run_directory(tmp_path):
    result = cli("train", "configs/mnist/quickstart.yaml", "train.micro_batch_size=-10", f"run.root={tmp_path}")
    assert_usage_error(result, "train.micro_batch_size", ">= 1")
    assert not any(tmp_path.iterdir())


def test_a_tracking_uri_of_no_store_exits_2_before_making_a_run_directory(tmp_path):
    """A misspelt URI (or MLflow 3's refused file store) trained to the end with its tracking failing, exit 0."""
    uri = f"file://{tmp_path}/mlruns"
    result = cli(
        "train",
        "configs/mnist/quickstart.yaml",
        "tracking.backend=mlflow",
        f"tracking.uri={uri}",
        f"run.root={tmp_path}",
    )
    assert_usage_error(result, uri, "sqlite:///")
    assert not any(tmp_path.iterdir())


def test_every_results_row_has_a_command_that_resolves():
    """docs/results.md's rows are reproducible from the command beside each: every `vegan-scale train` there loads
    (config and overrides valid), and its `vegan-scale eval` reads the run directory that training writes."""
    rows = re.findall(r"^\| (\S+ \S+) \| `vegan-scale train (.+?) --quiet && vegan-scale eval (\S+)` \|$",
                      (ROOT / "docs" / "results.md").read_text(), re.MULTILINE)  # fmt: skip
    assert len(rows) == 8 + 2 * 5 + 1, [r[0] for r in rows]  # the study's 8, 5 models on 2 data sets, as shipped
    for _, train, run_dir in rows:
        config, *overrides = train.split()
        cfg = load_experiment(ROOT / config, overrides)
        assert Path(cfg.run.root) / cfg.run.experiment / cfg.run.name == Path(run_dir), train


def test_the_python_api_checks_a_loaded_experiment_again_and_its_overrides(tmp_path: Path) -> None:
    """A configuration loaded, then changed in Python, was trained as it was: a run name that left run.root
    (``../../escape``), a negative step count (a run "finished" at step 0), an unknown network (a KeyError). Overrides
    given as one string were read letter by letter; a number among them was an AttributeError. Loading changed the
    caller's nested dicts."""
    import vegan_scale

    base = ["run.root=" + str(tmp_path / "runs"), "model.network=mlp"]
    for section, key, value, words in [
        ("run", "name", "../../escape", "run.name='../../escape' must be one directory name"),
        ("train", "max_steps", -5, "train.max_steps=-5 is out of range"),
        ("model", "network", "nonsense", "model.network='nonsense' is not one of"),
    ]:
        cfg = load_experiment(ROOT / "configs/mnist/wae_mmd.yaml", base)
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError, match=re.escape(words)):
            vegan_scale.train(cfg)
    for overrides in ["train.max_steps=5", [5], None]:
        with pytest.raises(ConfigError, match=r"overrides must be a list of key\.sub=value strings"):
            vegan_scale.train(ROOT / "configs/mnist/wae_mmd.yaml", overrides)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()
    given = {"inherit": [], "train": {"mixed_precision": False}}  # YAML's reading of `no`, put back as the word
    assert load_experiment(given).train.mixed_precision == "no"
    assert given == {"inherit": [], "train": {"mixed_precision": False}}  # the caller's dicts untouched
