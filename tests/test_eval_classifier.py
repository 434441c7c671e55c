"""The packaged feature networks: small enough to ship, and accurate on the real test sets."""

from __future__ import annotations

import pytest
import torch

from tests.paths import ROOT
from vegan_scale.data.images import load_images
from vegan_scale.data.index import read_index
from vegan_scale.evaluation.classifier import CLASSIFIERS, FEATURES, IMAGE_SHAPE, load_classifier, weights_path

DATA = {
    "mnist": (ROOT / ".data/shards/mnist/test", 0.98, "run `make data`"),
    "fashion_mnist": (
        ROOT / ".data/shards/fashion_mnist/test",
        0.88,
        "install Debian's dataset-fashion-mnist, then "
        "`vegan-scale shards fashion-mnist --out .data/shards/fashion_mnist`",
    ),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_weights_ship_small(name: str) -> None:
    assert weights_path(name).stat().st_size < 2_000_000


@pytest.mark.data
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_accuracy_on_the_real_test_set(name: str) -> None:
    shards, threshold, howto = DATA[name]
    if not (shards / "sizes.json").exists():
        pytest.skip(f"{name} test shards not found at {shards}; {howto}")
    images, labels = load_images(read_index(str(shards)), IMAGE_SHAPE, limit=10_000)
    model = load_classifier(name)
    with torch.no_grad():
        x = images.float() / 255
        predicted = torch.cat([model(b).argmax(dim=1) for b in x.split(2000)])
        features = model.features(x[:10])
    assert len(labels) == 10_000
    assert (predicted == labels).double().mean().item() >= threshold
    assert features.shape == (10, FEATURES)


@pytest.mark.parametrize("damage", ["cut short", "another network", "a directory", "a NaN weight"])
def test_weights_that_are_no_classifier_are_named(tmp_path, damage: str) -> None:
    """A classifier file cut short, another network's weights (an export's) or a directory named like a weight file
    were tracebacks from safetensors or load_state_dict, and a NaN weight was taken; each is one line naming the file
    and how to write one (not how to export a model)."""
    from safetensors.torch import load_file, save_file

    from vegan_scale.errors import ConfigError

    path = tmp_path / "c.safetensors"
    if damage == "cut short":
        path.write_bytes(weights_path("mnist").read_bytes()[:300])
    elif damage == "another network":
        save_file({"encoder.weight": torch.zeros(3, 3)}, path)
    elif damage == "a NaN weight":  # its FID was NaN or a LinAlgError traceback
        weights = load_file(weights_path("mnist"))
        next(iter(weights.values())).view(-1)[0] = float("nan")
        save_file(weights, path)
    else:
        path.mkdir()
    with pytest.raises(ConfigError, match=rf"{path} does not hold the evaluation classifier's weights .*tools/train"):
        load_classifier(str(path))
