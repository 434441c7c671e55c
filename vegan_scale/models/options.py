"""Each network's options, the ``model.<network>`` sections of an experiment.

They live apart from the networks (conv.py, mlp.py, resnet.py, pythae_conv.py) and import no torch, so that a
configuration is read and checked in a fraction of a second: ``vegan-scale config``, and ``train`` before it
loads torch, name a bad key or value at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from vegan_scale.config.fields import at_least, param


@dataclass
class ConvConfig:
    width: int = param(
        128,
        "Channels of the first encoder convolution, doubled at each of the four layers "
        "(the paper's 128-256-512-1024); reduce it for fast CPU runs.",
        bounds=at_least(1),
    )
    kernel_size: int = param(
        0,
        "Filter size; 0 picks the paper's choice from the image size (4 for 28x28, 5 for 64x64, 4 otherwise).",
        bounds=at_least(0),
    )
    batch_norm: bool = param(True, "Batch norm after every hidden convolution, as in the paper.")

    def refuses(self, side: int) -> str | None:
        """Why the network cannot take images of this side, if it cannot (a filter larger than the image would be
        mostly padding, and a huge one exhausts memory after minutes)."""
        if self.kernel_size > side:
            return f"takes a model.conv.kernel_size of at most data.image_size, not {self.kernel_size}"
        return None


@dataclass
class MLPConfig:
    hidden: list[int] = param(
        [512], "Hidden layer widths of the encoder; the decoder mirrors them.", bounds=at_least(1)
    )


@dataclass
class ResNetConfig:
    width: int = param(
        64, "Channels of the first stage; doubled at every down-sampling (width multiplier).", bounds=at_least(1)
    )
    depth: int = param(2, "Residual blocks per stage (depth multiplier).", bounds=at_least(1))
    max_multiplier: int = param(8, "Channels stop doubling at width * max_multiplier.", bounds=at_least(1))
    groups: int = param(32, "GroupNorm groups (fewer when a stage has fewer channels).", bounds=at_least(1))

    def refuses(self, side: int) -> str | None:
        """Why the network cannot take images of this side: its stages halve the side down to 4x4."""
        return None if side >= 8 and not side & (side - 1) else "needs a power-of-two data.image_size of at least 8"


@dataclass
class PythaeConvConfig:
    """No options: the pair is fixed."""

    def refuses(self, side: int) -> str | None:
        """Why the network cannot take images of this side: its decoder grows 4x4 to 7, 14 and 28."""
        return None if side == 28 else "is pythae's MNIST pair and takes data.image_size=28 only"
