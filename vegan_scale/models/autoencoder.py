"""Encoders Q(Z|X), decoders G(Z) and the auto-encoder that pairs them with a prior.

Encoder kinds (tolstikhin/wae ``e_noise``):

* ``deterministic``: z = E(x), the paper's choice for its experiments;
* ``gaussian``: z = mu(x) + sigma(x) * eps, reparameterised, with the log-variance clamped to
  [-LOGVAR_BOUND, LOGVAR_BOUND] as the official code does against numerical blow-ups;
* ``implicit``: z = h(E(x), eps), noise fed as an input to a small head, so Q(Z|X) can take any shape.

Decoder kinds: ``deterministic`` (G(z) = sigmoid of the logits) and ``gaussian`` (the same mean plus a learned
log-variance, one per output channel). Codes are mapped onto the prior's support (sphere, box) by the prior.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vegan_scale.models.base import ImageShape, NetworkSpec
from vegan_scale.models.outputs import LatentCodes, Reconstruction
from vegan_scale.priors import Prior

ENCODER_KINDS = ("deterministic", "gaussian", "implicit")
DECODER_KINDS = ("deterministic", "gaussian")
LOGVAR_BOUND = 50.0


class Encoder(nn.Module):
    """A network body with the head of one encoder kind."""

    def __init__(self, body: nn.Module, features: int, latent_dim: int, kind: str, noise_dim: int) -> None:
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"unknown encoder kind {kind!r}; expected one of {ENCODER_KINDS}")
        self.body, self.kind, self.noise_dim = body, kind, noise_dim
        if kind == "implicit":
            self.head = nn.Sequential(
                nn.Linear(features + noise_dim, features), nn.ReLU(inplace=True), nn.Linear(features, latent_dim)
            )
        else:
            self.head = nn.Linear(features, 2 * latent_dim if kind == "gaussian" else latent_dim)

    def forward(self, x: Tensor) -> LatentCodes:
        h = self.body(x)
        if self.kind == "deterministic":
            return LatentCodes(z=self.head(h))
        if self.kind == "implicit":
            eps = torch.randn(h.shape[0], self.noise_dim, device=h.device, dtype=h.dtype)
            return LatentCodes(z=self.head(torch.cat([h, eps], dim=1)))
        mean, logvar = self.head(h).chunk(2, dim=1)
        logvar = logvar.clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        return LatentCodes(z=z, mean=mean, logvar=logvar)


class Decoder(nn.Module):
    """A network body producing image logits, with a learned per-channel log-variance for the Gaussian kind."""

    def __init__(self, body: nn.Module, channels: int, kind: str) -> None:
        super().__init__()
        if kind not in DECODER_KINDS:
            raise ValueError(f"unknown decoder kind {kind!r}; expected one of {DECODER_KINDS}")
        self.body = body
        self.logvar = nn.Parameter(torch.zeros(1, channels, 1, 1)) if kind == "gaussian" else None

    def forward(self, z: Tensor) -> Reconstruction:
        logits = self.body(z)
        logvar = None if self.logvar is None else self.logvar.clamp(-LOGVAR_BOUND, LOGVAR_BOUND).expand_as(logits)
        return Reconstruction(logits=logits, logvar=logvar)


class AutoEncoderOutput(NamedTuple):
    """One pass of the auto-encoder: the codes Z ~ Q(Z|X) and the reconstruction G(Z)."""

    codes: LatentCodes
    recon: Reconstruction


class AutoEncoder(nn.Module):
    """Encoder, decoder and prior of a POT model; ``forward`` encodes then decodes."""

    def __init__(self, encoder: Encoder, decoder: Decoder, prior: Prior) -> None:
        super().__init__()
        self.encoder, self.decoder, self.prior = encoder, decoder, prior

    def encode(self, x: Tensor) -> LatentCodes:
        codes = self.encoder(x)
        return codes._replace(z=self.prior.to_support(codes.z))

    def decode(self, z: Tensor) -> Reconstruction:
        return self.decoder(z)

    def forward(self, x: Tensor) -> AutoEncoderOutput:
        codes = self.encode(x)
        return AutoEncoderOutput(codes=codes, recon=self.decode(codes.z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """G(E(x)): the decoder's mean images for a batch of images in [0, 1]."""
        return self(x).recon.mean

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images G(z), z ~ P_Z: the decoder's mean images in [0, 1].

        Decoded in eval mode, as evaluation does: in train mode batch norm would make each image depend on the
        others in the batch and would update its running statistics with prior codes.
        """
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            return self.decode(self.prior.sample(n, device=device, generator=generator)).mean
        finally:
            self.train(was_training)


def build_autoencoder(
    network: NetworkSpec,
    options: object,
    shape: ImageShape,
    prior: Prior,
    encoder: str,
    decoder: str,
    noise_dim: int,
) -> AutoEncoder:
    """Assemble an auto-encoder from a registered network, its options and the encoder/decoder kinds."""
    body, features = network.encoder_body(options, shape)
    return AutoEncoder(
        Encoder(body, features, prior.dim, encoder, noise_dim),
        Decoder(network.decoder_body(options, prior.dim, shape), shape[0], decoder),
        prior,
    )
