"""KL, sliced Wasserstein and adversarial penalties against closed forms, torch.distributions and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vegan_scale.models.outputs import LatentCodes
from vegan_scale.penalties import adversarial, kl, sliced
from vegan_scale.penalties.adversarial import critic_log_loss, non_saturating_loss
from vegan_scale.penalties.kl import gaussian_kl
from vegan_scale.penalties.options import AdversarialConfig, KLConfig, SlicedConfig
from vegan_scale.penalties.sliced import sliced_wasserstein
from vegan_scale.priors import Prior


def prior_normal(sigma2):
    """N(0, sigma2) with float64 parameters (plain floats would make torch.distributions use float32)."""
    return Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(sigma2, dtype=torch.float64).sqrt())


@pytest.mark.parametrize("sigma2", [1.0, 0.3, 4.0])
def test_gaussian_kl_matches_torch_distributions(sigma2):
    """gaussian_kl equals the batch mean of torch.distributions' KL summed over coordinates (float64)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(7, 5, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(7, 5, generator=g, dtype=torch.float64) * 1.5
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), prior_normal(sigma2)).sum(dim=1).mean()
    torch.testing.assert_close(gaussian_kl(mean, logvar, sigma2), ref, rtol=1e-12, atol=1e-12)


def test_gaussian_kl_is_zero_at_the_prior_and_float32_under_autocast():
    """KL(N(0, s) || N(0, s)) = 0; bf16 inputs under autocast give a float32 result close to the float64 value."""
    mean, logvar = torch.zeros(3, 4), torch.full((3, 4), math.log(2.5))
    assert gaussian_kl(mean, logvar, 2.5).abs() < 1e-6
    g = torch.Generator().manual_seed(1)
    m16 = torch.randn(6, 4, generator=g).bfloat16()
    l16 = torch.randn(6, 4, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = gaussian_kl(m16, l16)
    ref = kl_divergence(Normal(m16.double(), (0.5 * l16.double()).exp()), prior_normal(1.0)).sum(1).mean()
    assert v.dtype == torch.float32
    torch.testing.assert_close(v.double(), ref, rtol=1e-5, atol=1e-6)


def test_kl_penalty_builder_and_call():
    """The built KL penalty reads codes.mean/logvar and uses the prior's variance; reference: torch.distributions."""
    prior = Prior("gaussian", 3, 2.0)
    penalty = kl.build(KLConfig(), prior, "gaussian")
    g = torch.Generator().manual_seed(2)
    mean, logvar = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g).double()
    codes = LatentCodes(z=torch.zeros(5, 3), mean=mean, logvar=logvar)
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), prior_normal(2.0)).sum(1).mean()
    torch.testing.assert_close(penalty(codes, torch.zeros(5, 3)), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("encoder", "prior_kind"),
    [("deterministic", "gaussian"), ("implicit", "gaussian"), ("gaussian", "sphere"), ("gaussian", "box")],
)
def test_kl_penalty_refuses_non_gaussian_encoder_or_prior(encoder, prior_kind):
    """The KL builder raises ValueError unless both the encoder and the prior are Gaussian."""
    with pytest.raises(ValueError, match="kl needs"):
        kl.build(KLConfig(), Prior(prior_kind, 2), encoder)


def brute_force_sw(z, p, directions, power):
    """Mean over directions of the optimal 1-D assignment cost, found by trying every permutation."""
    costs = []
    for theta in directions:
        a, b = (z @ theta).tolist(), (p @ theta).tolist()
        costs.append(
            min(
                sum(abs(a[i] - b[perm[i]]) ** power for i in range(len(a))) / len(a)
                for perm in itertools.permutations(range(len(b)))
            )
        )
    return sum(costs) / len(costs)


@pytest.mark.parametrize(("n", "d", "power"), [(1, 2, 2.0), (4, 3, 2.0), (5, 2, 1.0), (6, 4, 1.5), (6, 3, 3.0)])
def test_sliced_wasserstein_matches_brute_force_assignment(n, d, power):
    """SW_p^p along given directions equals brute-force optimal matching over all permutations (float64)."""
    g = torch.Generator().manual_seed(n * 10 + d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.3
    directions = torch.randn(5, d, generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    value = sliced_wasserstein(z, p, directions, power)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(brute_force_sw(z, p, directions, power), rel=1e-12, abs=1e-14)


def test_sliced_wasserstein_float32_and_errors():
    """Float32 inputs agree with the float64 brute force to ~1e-5; unequal sample shapes raise ValueError."""
    g = torch.Generator().manual_seed(3)
    z, p = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g) + 1
    directions = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    ref = brute_force_sw(z.double(), p.double(), directions.double(), 2.0)
    assert sliced_wasserstein(z, p, directions).item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="equally large"):
        sliced_wasserstein(z, p[:4], directions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_directions_are_unit_vectors(dtype):
    """random_directions returns [count, dim] rows of norm 1 in the dtype of the reference tensor."""
    torch.manual_seed(4)
    directions = sliced.random_directions(100, 7, torch.zeros(1, dtype=dtype))
    assert directions.shape == (100, 7) and directions.dtype == dtype
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(100, dtype=dtype))
    # uniform on the sphere: mean direction near 0 (each coordinate has variance 1/dim)
    assert directions.mean(0).abs().max() < 4 * math.sqrt(1 / 7 / 100)


def test_sliced_penalty_builder():
    """The sliced builder rejects projections < 1 or p < 1; its penalty is 0 for identical samples."""
    with pytest.raises(ValueError):
        sliced.build(SlicedConfig(projections=0), Prior("gaussian", 2), "deterministic")
    with pytest.raises(ValueError):
        sliced.build(SlicedConfig(p=0.5), Prior("gaussian", 2), "deterministic")
    penalty = sliced.build(SlicedConfig(projections=3), Prior("gaussian", 2), "deterministic")
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    assert penalty(LatentCodes(z=z), z[torch.randperm(8)]).item() == pytest.approx(0.0, abs=1e-6)


def test_critic_and_encoder_log_losses_by_hand():
    """critic_log_loss and non_saturating_loss equal -mean log sigmoid / log(1 - sigmoid) written out in float64."""
    g = torch.Generator().manual_seed(6)
    lp = torch.randn(9, 1, generator=g, dtype=torch.float64) * 3
    lq = torch.randn(7, 1, generator=g, dtype=torch.float64) * 3
    sig = lambda t: 1.0 / (1.0 + torch.exp(-t))  # noqa: E731
    ref_critic = -torch.log(sig(lp)).mean() - torch.log(1.0 - sig(lq)).mean()
    torch.testing.assert_close(critic_log_loss(lp, lq), ref_critic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(non_saturating_loss(lq), -torch.log(sig(lq)).mean(), rtol=1e-12, atol=1e-12)


def test_adversarial_penalty_gradients_reach_codes_not_critic():
    """The encoder's penalty back-propagates into the codes only; the critic's .grad stays None."""
    torch.manual_seed(7)
    penalty = adversarial.build(AdversarialConfig(hidden=16, layers=2), Prior("gaussian", 3), "gaussian")
    z = torch.randn(6, 3, requires_grad=True)
    value = penalty(LatentCodes(z=z), torch.randn(6, 3))
    with torch.no_grad():  # reference: the same loss through the critic called the ordinary way
        ref = -torch.nn.functional.logsigmoid(penalty.critic(z)).mean()
    torch.testing.assert_close(value.detach(), ref)
    value.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in penalty.critic.parameters())


def test_adversarial_critic_loss_trains_the_critic_only():
    """critic_loss gives the critic gradients and none to the codes; its value is the hand-written log-loss."""
    torch.manual_seed(8)
    penalty = adversarial.build(AdversarialConfig(hidden=16, layers=2), Prior("gaussian", 3), "gaussian")
    z_q, z_p = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3)
    loss = penalty.critic_loss(penalty.critic, z_q, z_p)
    with torch.no_grad():
        ref = (
            -torch.log(torch.sigmoid(penalty.critic(z_p))).mean()
            - torch.log(1 - torch.sigmoid(penalty.critic(z_q))).mean()
        )
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert z_q.grad is None
    assert all(p.grad is not None for p in penalty.critic.parameters())
    assert sum(p.grad.abs().sum() for p in penalty.critic.parameters()) > 0
