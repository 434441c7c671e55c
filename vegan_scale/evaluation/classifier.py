"""The feature network of the LeNet-space metrics: a small classifier trained on each 28x28 grey data set.

FID, KID and precision/recall need a feature space in which distances mean something for the data at hand. For
MNIST-like images a classifier trained on the same data set is the usual choice (Bińkowski et al. 2018 use a LeNet
for MNIST): its penultimate layer separates the classes and ignores what no class depends on. Inception features
(``inception.py``) are the standard for natural images and an optional cross-check here.

Weights ship with the package (``weights/<name>.safetensors``, written by ``tools/train_classifier.py`` with a
fixed seed); the metrics are only comparable between evaluations that use the same file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from vegan_scale import checkpoint, export
from vegan_scale.errors import ConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIERS = ("mnist", "fashion_mnist")
IMAGE_SHAPE = (1, 28, 28)
FEATURES = 128


class LeNet(nn.Module):
    """Two 5x5 convolutions with max pooling, a 128-unit hidden layer (the features) and 10 logits."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURES),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations [N, 128] of images [N, 1, 28, 28] in [0, 1]."""
        return self.body(x - 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


def weights_path(name: str) -> Path:
    """The packaged weight file of classifier ``name``, or ``name`` itself when it is a path to a file."""
    if Path(name).suffix == ".safetensors":
        return Path(name)
    if name not in CLASSIFIERS:
        raise ConfigError(f"unknown classifier {name!r}; expected one of {CLASSIFIERS} or a .safetensors file")
    return WEIGHTS_DIR / f"{name}.safetensors"


def load_classifier(name: str, device: torch.device | str = "cpu") -> LeNet:
    """A packaged classifier (``mnist``, ``fashion_mnist``) or one saved by ``tools/train_classifier.py``, in
    evaluation mode."""
    path = weights_path(name)
    if not path.exists():
        raise ConfigError(f"classifier weights {path} not found; write them with tools/train_classifier.py")
    model = LeNet()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        weights = export.load_weights(path) if export.weight_shapes(path) == expected else None
    except ConfigError:  # not a safetensors file, or one cut short: its remedy is the classifier's, not an export's
        weights = None
    broken = checkpoint.first_non_finite(weights) if weights is not None else None
    if weights is None or broken is not None:  # another network's weights (an export's, say), or damaged ones
        raise ConfigError(
            f"{path} does not hold the evaluation classifier's weights (a LeNet for {IMAGE_SHAPE} images"
            f"{f'; {broken} holds NaN or infinite values' if broken else ''}); write them with "
            "tools/train_classifier.py"
        )
    model.load_state_dict(weights)
    return model.to(device).eval()
