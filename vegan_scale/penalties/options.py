"""Each latent penalty's options, the ``penalty.<kind>`` sections of an experiment, and what a penalty asks of the
rest of the experiment.

They live apart from the math (kernel_mmd.py, adversarial.py, kl.py, sliced.py) and import no torch, so that a
configuration is read and checked in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

from vegan_scale.config.fields import POSITIVE_FLOAT32, Requirement, at_least, param

KERNELS = ("imq", "rbf")
BANDWIDTHS = ("prior", "median")
GAUSSIAN = ("gaussian",)  # the KL penalty's closed form needs a Gaussian encoder and prior


@dataclass(frozen=True)
class PenaltyTraits:
    """A penalty as the schema and the engine see it: its options, whether it trains a critic of its own, the
    encoder and prior kinds it works with (None: any), and the rules its options bring (dotted keys)."""

    options: type
    trains_critic: bool = False
    encoders: tuple[str, ...] | None = None
    priors: tuple[str, ...] | None = None
    rules: tuple[Requirement, ...] = ()


@dataclass
class MMDConfig:
    """WAE-MMD: the unbiased MMD^2 between the codes and a prior sample."""

    kernel: str = param(
        "imq",
        "Kernel of the MMD: multi-scale inverse multiquadratic or Gaussian (RBF); scales "
        "come from the prior's variance.",
        choices=KERNELS,
    )
    bandwidth: str = param(
        "prior",
        "RBF bandwidth: prior, from the prior's variance (a kernel independent of the batch); median, the official "
        "code's median heuristic over the (global) batch, for the paper's IMQ-against-RBF comparison.",
        choices=BANDWIDTHS,
    )
    scope: str = param(
        "global",
        "global: the estimator over the codes of all processes (the paper's estimator at the global batch; each "
        "process computes its rows against all, O(n N d)); local: each process's own batch only (O(n^2 d), a "
        "noisier estimate). With gradient accumulation, global means across processes within one micro-step.",
        choices=("global", "local"),
    )

    def too_few(self, micro: int, processes: int) -> str | None:
        """Why micro-batches of ``micro`` samples on each of ``processes`` processes are too few for the unbiased
        estimate, which needs two codes (a micro-batch of one ended the run at its first step), if they are."""
        codes = micro * processes if self.scope == "global" else micro
        if codes >= 2:
            return None
        where = "the codes of a micro-step over all processes" if self.scope == "global" else "a process's micro-batch"
        return f"needs at least 2 codes per estimate (penalty.mmd.scope={self.scope}: {where}), not {codes}"


@dataclass
class AdversarialConfig:
    """WAE-GAN / AAE: a latent critic with the non-saturating encoder loss."""

    hidden: int = param(
        512, "Width of each hidden layer of the latent critic (the WAE MNIST recipe uses 512).", bounds=at_least(1)
    )
    layers: int = param(4, "Number of hidden layers of the latent critic (0: a linear critic).", bounds=at_least(0))
    lr: float = param(
        5e-4,
        "Adam learning rate of the critic (WAE MNIST recipe: 5e-4); follows the same schedule as the auto-encoder's.",
        bounds=POSITIVE_FLOAT32,
    )
    p_trick: bool = param(
        False,
        "Add the Gaussian prior's log-density to the critic's logits (the official gan_p_trick; its CelebA recipe).",
    )
    reencode: bool = param(
        False, "The critic's step sees the codes encoded again after the auto-encoder's step (the official order)."
    )
    init_std: float | None = param(
        None,
        "Normal initialisation of the critic's weights, biases zero (official: 0.0099999).",
        bounds=POSITIVE_FLOAT32,
    )


@dataclass
class KLConfig:
    """VAE: the closed-form KL from each Gaussian posterior to a Gaussian prior. It has no options of its own: its
    weight is ``penalty.weight`` (1 for the plain VAE)."""


@dataclass
class SlicedConfig:
    """SWAE: the sliced Wasserstein distance along random directions."""

    projections: int = param(50, "Number of random directions per step.", bounds=at_least(1))
    p: float = param(2.0, "Order p of the sliced Wasserstein distance; the penalty is SW_p^p.", bounds=at_least(1))
    scope: str = param(
        "global",
        "global: the estimate over the codes of all processes (the same as one process's on the whole global "
        "batch, so lambda means the same at every world size); local: each process's own batch.",
        choices=("global", "local"),
    )
