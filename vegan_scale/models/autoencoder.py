"""Encoders Q(Z|X), decoders G(Z) and the auto-encoder that pairs them with a prior.

Encoder kinds (tolstikhin/wae ``e_noise``):

* ``deterministic``: z = E(x), the paper's choice for its experiments;
* ``gaussian``: z = mu(x) + sigma(x) * eps, reparameterised, with the log-variance clamped to
  [-LOGVAR_BOUND, LOGVAR_BOUND] as the official code does against numerical blow-ups;
* ``implicit``: z = h(E(x), eps), noise fed as an input to a small head, so Q(Z|X) can take any shape.

Decoder kinds: ``deterministic`` (G(z) = sigmoid of the logits, or tanh for data in [-1, 1]) and ``gaussian`` (the
same mean plus a learned log-variance, one per output channel). Codes are mapped onto the prior's support
(sphere, box) by the prior.

The official code's stabilisers are options of the builder: ``init_std`` draws every weight from a normal
distribution of that deviation (truncated at two deviations for convolutions, as TensorFlow's initialisers there)
with zero biases; ``input_noise`` adds truncated normal noise of that deviation to the encoder's input while
training (``e_noise='add_noise'``, a simple random encoder).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vegan_scale.models.base import ImageShape, NetworkSpec
from vegan_scale.models.outputs import LatentCodes, Reconstruction
from vegan_scale.noise import StepNoise, normal, truncated_normal
from vegan_scale.priors import Prior

ENCODER_KINDS = ("deterministic", "gaussian", "implicit")
DECODER_KINDS = ("deterministic", "gaussian")
LOGVAR_BOUND = 50.0


class Encoder(nn.Module):
    """A network body with the head of one encoder kind."""

    def __init__(
        self, body: nn.Module, features: int, latent_dim: int, kind: str, noise_dim: int, input_noise: float = 0.0
    ) -> None:
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"unknown encoder kind {kind!r}; expected one of {ENCODER_KINDS}")
        self.body, self.kind, self.noise_dim, self.input_noise = body, kind, noise_dim, input_noise
        if kind == "implicit":
            self.head = nn.Sequential(
                nn.Linear(features + noise_dim, features), nn.ReLU(inplace=True), nn.Linear(features, latent_dim)
            )
        else:
            self.head = nn.Linear(features, 2 * latent_dim if kind == "gaussian" else latent_dim)

    def forward(self, x: Tensor, noise: StepNoise | None = None) -> LatentCodes:
        """Codes of ``x``; the random ones drawn from ``noise`` (a training step's) or torch's generator."""
        if self.training and self.input_noise:
            x = x + truncated_normal(noise, "input", x, self.input_noise)
        h = self.body(x)
        if self.kind == "deterministic":
            return LatentCodes(z=self.head(h))
        if self.kind == "implicit":
            eps = normal(noise, "encoder", (h.shape[0], self.noise_dim), h)
            return LatentCodes(z=self.head(torch.cat([h, eps], dim=1)))
        mean, logvar = self.head(h).chunk(2, dim=1)
        logvar = logvar.clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
        z = mean + normal(noise, "encoder", tuple(mean.shape), mean) * torch.exp(0.5 * logvar)
        return LatentCodes(z=z, mean=mean, logvar=logvar)


class Decoder(nn.Module):
    """A network body producing image logits, with a learned per-channel log-variance for the Gaussian kind."""

    def __init__(self, body: nn.Module, channels: int, kind: str, symmetric: bool = False) -> None:
        super().__init__()
        if kind not in DECODER_KINDS:
            raise ValueError(f"unknown decoder kind {kind!r}; expected one of {DECODER_KINDS}")
        self.body, self.symmetric = body, symmetric
        self.logvar = nn.Parameter(torch.zeros(1, channels, 1, 1)) if kind == "gaussian" else None

    def forward(self, z: Tensor) -> Reconstruction:
        logits = self.body(z)
        logvar = None if self.logvar is None else self.logvar.clamp(-LOGVAR_BOUND, LOGVAR_BOUND).expand_as(logits)
        return Reconstruction(logits=logits, logvar=logvar, symmetric=self.symmetric)


class AutoEncoderOutput(NamedTuple):
    """One pass of the auto-encoder: the codes Z ~ Q(Z|X) and the reconstruction G(Z)."""

    codes: LatentCodes
    recon: Reconstruction


class AutoEncoder(nn.Module):
    """Encoder, decoder and prior of a POT model; ``forward`` encodes then decodes."""

    def __init__(self, encoder: Encoder, decoder: Decoder, prior: Prior) -> None:
        super().__init__()
        self.encoder, self.decoder, self.prior = encoder, decoder, prior

    def encode(self, x: Tensor, noise: StepNoise | None = None) -> LatentCodes:
        codes = self.encoder(x, noise)
        return codes._replace(z=self.prior.to_support(codes.z))

    def decode(self, z: Tensor) -> Reconstruction:
        return self.decoder(z)

    def forward(self, x: Tensor, noise: StepNoise | None = None) -> AutoEncoderOutput:
        codes = self.encode(x, noise)
        return AutoEncoderOutput(codes=codes, recon=self.decode(codes.z))

    @property
    def symmetric(self) -> bool:
        """Whether the model works on images in [-1, 1] (else [0, 1])."""
        return self.decoder.symmetric

    def to_model(self, images: Tensor) -> Tensor:
        """Images in [0, 1] as the model takes them (the same, or in [-1, 1])."""
        return images * 2 - 1 if self.symmetric else images

    def to_images(self, x: Tensor) -> Tensor:
        """The model's images (in its range) in [0, 1]."""
        return (x + 1) / 2 if self.symmetric else x

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """G(E(x)): the decoder's mean images for a batch of images, both in [0, 1]."""
        return self.to_images(self(self.to_model(images)).recon.mean)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images G(z), z ~ P_Z: the decoder's mean images in [0, 1].

        Decoded in eval mode, as evaluation does: in train mode batch norm would make each image depend on the
        others in the batch and would update its running statistics with prior codes.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # randn's own errors name no argument
            raise ValueError(f"sample(n) takes a positive whole number of images, got {n!r}")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            return self.to_images(self.decode(self.prior.sample(n, device=device, generator=generator)).mean)
        finally:
            self.train(was_training)


def init_weights(module: nn.Module, std: float) -> None:
    """The official code's initialisation: weights normal with deviation ``std`` (truncated at two deviations for
    convolutions), biases zero; normalisation layers keep scale 1 and shift 0."""
    for m in module.modules():
        init_layer(m, std)


def init_layer(m: nn.Module, std: float) -> None:
    """:func:`init_weights` for one module's own parameters (nothing for a module that is not a layer it sets)."""
    if isinstance(m, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d)):
        if isinstance(m, nn.Conv2d):
            torch.nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
        else:
            torch.nn.init.normal_(m.weight, 0.0, std)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)


def build_autoencoder(
    network: NetworkSpec,
    options: object,
    shape: ImageShape,
    prior: Prior,
    encoder: str,
    decoder: str,
    noise_dim: int,
    *,
    input_noise: float = 0.0,
    init_std: float | None = None,
    symmetric: bool = False,
) -> AutoEncoder:
    """Assemble an auto-encoder from a registered network, its options and the encoder/decoder kinds, with the
    official code's initialisation (``init_std``) and input noise where asked, for data in [0, 1] or, with
    ``symmetric``, in [-1, 1]."""
    body, features = network.encoder_body(options, shape)
    model = AutoEncoder(
        Encoder(body, features, prior.dim, encoder, noise_dim, input_noise),
        Decoder(network.decoder_body(options, prior.dim, shape), shape[0], decoder, symmetric),
        prior,
    )
    if init_std is not None:
        init_weights(model, init_std)
    return model
