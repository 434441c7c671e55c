"""Encoders, decoders and the auto-encoder: shapes, the WAE paper's conv architecture, and output conventions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vegan_scale.models import conv, mlp
from vegan_scale.models.autoencoder import LOGVAR_BOUND, Decoder, Encoder, build_autoencoder
from vegan_scale.models.options import ConvConfig, MLPConfig
from vegan_scale.models.outputs import Reconstruction
from vegan_scale.priors import Prior

NETWORKS = {"mlp": (mlp.SPEC, MLPConfig(hidden=[32])), "conv": (conv.SPEC, ConvConfig(width=4))}
SHAPES = [(1, 28, 28), (3, 64, 64)]


@pytest.mark.parametrize("network", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("encoder", ["deterministic", "gaussian", "implicit"])
@pytest.mark.parametrize("decoder", ["deterministic", "gaussian"])
def test_autoencoder_output_shapes(network, shape, encoder, decoder):
    """Codes are [B, d] and logits [B, C, H, W]; mean/logvar set only by the Gaussian encoder/decoder."""
    torch.manual_seed(0)
    spec, options = NETWORKS[network]
    model = build_autoencoder(spec, options, shape, Prior("gaussian", 5), encoder, decoder, noise_dim=3)
    x = torch.rand(3, *shape)
    out = model(x)
    assert out.codes.z.shape == (3, 5)
    assert out.recon.logits.shape == (3, *shape)
    if encoder == "gaussian":
        assert out.codes.mean.shape == out.codes.logvar.shape == (3, 5)
    else:
        assert out.codes.mean is None and out.codes.logvar is None
    if decoder == "gaussian":
        assert out.recon.logvar.shape == (3, *shape)
    else:
        assert out.recon.logvar is None
    assert out.recon.sample().shape == (3, *shape)


@pytest.mark.parametrize("encoder", ["gaussian", "implicit"])
def test_stochastic_encoders_draw_noise(encoder):
    """Gaussian and implicit encoders give different codes for the same input on two calls; deterministic does not."""
    torch.manual_seed(1)
    spec, options = NETWORKS["mlp"]
    model = build_autoencoder(spec, options, (1, 28, 28), Prior("gaussian", 4), encoder, "deterministic", 2)
    det = build_autoencoder(spec, options, (1, 28, 28), Prior("gaussian", 4), "deterministic", "deterministic", 2)
    x = torch.rand(2, 1, 28, 28)
    assert not torch.equal(model.encode(x).z, model.encode(x).z)
    assert torch.equal(det.encode(x).z, det.encode(x).z)


def test_gaussian_encoder_reparameterisation_and_clamp():
    """z = mean + exp(logvar / 2) * eps with the same eps; raw log-variances beyond +-50 are clamped to +-50."""
    torch.manual_seed(2)
    encoder = Encoder(nn.Flatten(), 4, 2, "gaussian", noise_dim=0)
    with torch.no_grad():
        encoder.head.weight.zero_()
        encoder.head.bias.copy_(torch.tensor([0.5, -1.0, 80.0, -80.0]))  # mean (0.5, -1), raw logvar (80, -80)
    torch.manual_seed(3)
    codes = encoder(torch.zeros(6, 4))
    torch.manual_seed(3)
    eps = torch.randn(6, 2)
    assert codes.logvar.tolist() == [[LOGVAR_BOUND, -LOGVAR_BOUND]] * 6 == [[50.0, -50.0]] * 6
    expected = torch.tensor([0.5, -1.0]) + eps * torch.tensor([50.0, -50.0]).mul(0.5).exp()
    torch.testing.assert_close(codes.z, expected)
    assert torch.isfinite(codes.z).all()


def test_gaussian_decoder_logvar_is_per_channel_and_clamped():
    """The Gaussian decoder's log-variance is one learned value per channel, clamped to +-50, broadcast to logits."""
    decoder = Decoder(nn.Unflatten(1, (3, 2, 2)), channels=3, kind="gaussian")
    with torch.no_grad():
        decoder.logvar.copy_(torch.tensor([-70.0, 0.3, 90.0]).view(1, 3, 1, 1))
    recon = decoder(torch.zeros(2, 12))
    assert recon.logvar.shape == (2, 3, 2, 2)
    assert recon.logvar[:, 0].eq(-50.0).all() and recon.logvar[:, 1].eq(0.3).all() and recon.logvar[:, 2].eq(50).all()


@pytest.mark.parametrize("kind", ["kind", "bernoulli"])
def test_unknown_encoder_or_decoder_kind_raises(kind):
    """Unknown encoder and decoder kinds are ValueErrors."""
    with pytest.raises(ValueError, match="unknown encoder"):
        Encoder(nn.Flatten(), 4, 2, kind, 0)
    with pytest.raises(ValueError, match="unknown decoder"):
        Decoder(nn.Flatten(), 1, kind)


def test_reconstruction_mean_is_sigmoid_of_logits():
    """Reconstruction.mean is 1 / (1 + exp(-logits)); sample() is the mean for a deterministic decoder."""
    logits = torch.linspace(-30, 30, 13, dtype=torch.float64).view(1, 1, 1, 13)
    recon = Reconstruction(logits=logits)
    torch.testing.assert_close(recon.mean, 1.0 / (1.0 + torch.exp(-logits)))
    assert torch.equal(recon.sample(), recon.mean)


@pytest.mark.parametrize("network", ["mlp", "conv"])
@pytest.mark.parametrize("decoder", ["deterministic", "gaussian"])
def test_sample_images_in_unit_interval(network, decoder):
    """AutoEncoder.sample(n) gives [n, C, H, W] images in [0, 1], without building a graph."""
    torch.manual_seed(4)
    spec, options = NETWORKS[network]
    model = build_autoencoder(spec, options, (3, 64, 64), Prior("box", 6, 2.0), "deterministic", decoder, 0)
    images = model.sample(4, generator=torch.Generator().manual_seed(5))
    assert images.shape == (4, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    assert not images.requires_grad


def test_sample_leaves_the_model_untouched():
    """sample() equals the eval-mode decode of the same prior draw and changes neither the state nor the mode."""
    torch.manual_seed(5)
    spec, options = NETWORKS["conv"]
    prior = Prior("gaussian", 4)
    model = build_autoencoder(spec, options, (1, 28, 28), prior, "deterministic", "deterministic", 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = model.sample(4, generator=torch.Generator().manual_seed(6))
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # batch-norm statistics kept
    model.eval()
    with torch.no_grad():
        ref = model.decode(prior.sample(4, generator=torch.Generator().manual_seed(6))).mean
    torch.testing.assert_close(images, ref)


@pytest.mark.parametrize("encoder", ["deterministic", "gaussian", "implicit"])
def test_sphere_prior_puts_codes_on_the_sphere(encoder):
    """With a sphere prior of radius r, every code has norm r; with a box prior, every coordinate is within r."""
    torch.manual_seed(6)
    spec, options = NETWORKS["mlp"]
    x = torch.rand(5, 1, 28, 28)
    sphere = build_autoencoder(spec, options, (1, 28, 28), Prior("sphere", 8, 1.5), encoder, "deterministic", 2)
    torch.testing.assert_close(sphere(x).codes.z.norm(dim=1), torch.full((5,), 1.5))
    box = build_autoencoder(spec, options, (1, 28, 28), Prior("box", 8, 0.5), encoder, "deterministic", 2)
    assert box(x).codes.z.abs().max() <= 0.5


@pytest.mark.parametrize(("side", "expected"), [(28, (2, 7)), (64, (3, 8)), (32, (2, 8)), (7, (0, 7)), (56, (3, 7))])
def test_decoder_grid(side, expected):
    """decoder_grid(side) = (stride-2 up-samplings, first side): (2, 7) for 28, (3, 8) for 64, (2, 8) for 32."""
    assert conv.decoder_grid(side) == expected
    ups, s0 = expected
    assert s0 * 2**ups == side


def record_shapes(model, x, types):
    """Output shapes of every submodule of the given types, in call order, via forward hooks."""
    shapes = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: shapes.append((type(mod).__name__, tuple(out.shape))))
        for m in model.modules()
        if isinstance(m, types)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


# the WAE paper's decoders: (channels, side) of the first feature map and of each transposed convolution
PAPER_DECODERS = {28: [(1024, 7), (512, 14), (256, 28)], 64: [(1024, 8), (512, 16), (256, 32), (128, 64)]}


@pytest.mark.parametrize(("shape", "kernel"), [((1, 28, 28), 4), ((3, 64, 64), 5)])
def test_conv_architecture_matches_the_wae_paper(shape, kernel):
    """width=128: encoder convs 128-256-512-1024 (4x4 for 28, 5x5 for 64); decoder from 1024 x s0 x s0, halving."""
    torch.manual_seed(7)
    cfg = ConvConfig(width=128)
    c, side, _ = shape
    encoder, features = conv.conv_encoder_body(cfg, shape)
    enc_convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in enc_convs] == [128, 256, 512, 1024]
    assert [m.in_channels for m in enc_convs] == [c, 128, 256, 512]
    assert all(m.kernel_size == (kernel, kernel) and m.stride == (2, 2) for m in enc_convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in encoder.modules()) == 4
    enc_shapes = record_shapes(encoder, torch.rand(2, *shape), (nn.Conv2d, nn.Flatten))
    assert enc_shapes[-1] == ("Flatten", (2, features))
    assert [s[1][1] for s in enc_shapes[:4]] == [128, 256, 512, 1024]

    decoder = conv.conv_decoder_body(cfg, 8, shape)
    dec_shapes = record_shapes(decoder, torch.randn(2, 8), (nn.Unflatten, nn.ConvTranspose2d, nn.Conv2d))
    (c0, s0), *ups = PAPER_DECODERS[side]
    expected = [("Unflatten", (2, c0, s0, s0))]
    expected += [("ConvTranspose2d", (2, ch, s, s)) for ch, s in ups]
    expected += [("Conv2d", (2, c, side, side))]
    assert dec_shapes == expected
    dec_convs = [m for m in decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(m.kernel_size == (kernel, kernel) for m in dec_convs)


def test_conv_decoder_rejects_non_square_images():
    """The conv decoder needs square images (ValueError otherwise)."""
    with pytest.raises(ValueError, match="square"):
        conv.conv_decoder_body(ConvConfig(width=4), 4, (1, 28, 32))


def test_mlp_bodies():
    """The MLP encoder is Flatten-Linear-ReLU per hidden width; the decoder mirrors the widths back to the image."""
    cfg = MLPConfig(hidden=[32, 16])
    encoder, features = mlp.mlp_encoder_body(cfg, (1, 28, 28))
    assert features == 16
    linears = [(m.in_features, m.out_features) for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert linears == [(784, 32), (32, 16)]
    decoder = mlp.mlp_decoder_body(cfg, 5, (1, 28, 28))
    linears = [(m.in_features, m.out_features) for m in decoder.modules() if isinstance(m, nn.Linear)]
    assert linears == [(5, 16), (16, 32), (32, 784)]
    assert mlp.mlp_encoder_body(MLPConfig(hidden=[]), (3, 4, 4))[1] == 48
