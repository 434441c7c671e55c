"""A training step's random numbers (vegan_scale.noise): a function of (seed, step, what is drawn, the sample's
place in the global batch), so that a sample gets the same numbers at any world size and micro-batch split."""

from __future__ import annotations

import pytest
import torch

from vegan_scale.costs import reconstruction_cost
from vegan_scale.engine.objective import pot_objective
from vegan_scale.models import mlp
from vegan_scale.models.autoencoder import build_autoencoder
from vegan_scale.models.options import MLPConfig
from vegan_scale.noise import StepNoise, normal, truncated_normal, uniform
from vegan_scale.penalties.sliced import SlicedPenalty
from vegan_scale.priors import Prior
from vegan_scale.seeds import mix_seed

GLOBAL = 12
LIKE = torch.empty(0, dtype=torch.float64)


def splits(world: int, accumulation: int) -> list[range]:
    """The global-batch rows of each micro-batch of each rank, in rank then micro-batch order."""
    micro = GLOBAL // world // accumulation
    return [range(first, first + micro) for first in range(0, GLOBAL, micro)]


@pytest.mark.parametrize(("world", "accumulation"), [(2, 1), (3, 2), (4, 1), (6, 2), (12, 1)])
def test_every_split_draws_the_rows_of_one_process(world, accumulation):
    """Per-sample draws (normal, uniform, truncated normal) of every micro-batch of every rank, put together in
    order, are one process's draws for the whole global batch; per-step draws are the same everywhere."""
    whole = StepNoise(seed=3, step=7, rows=range(GLOBAL), global_rows=GLOBAL)
    parts = [StepNoise(3, 7, rows, GLOBAL) for rows in splits(world, accumulation)]
    draws = {
        "normal": lambda n: normal(n, "encoder", (len(n.rows), 5), LIKE),
        "uniform": lambda n: uniform(n, "prior", (len(n.rows), 2, 3), LIKE),
        "truncated": lambda n: truncated_normal(
            n, "input", torch.empty(len(n.rows), 1, 4, 4, dtype=torch.float64), 0.1
        ),
    }
    for name, draw in draws.items():
        assert torch.equal(torch.cat([draw(p) for p in parts]), draw(whole)), name
    assert all(
        torch.equal(p.shared("directions", (4, 3), LIKE), whole.shared("directions", (4, 3), LIKE)) for p in parts
    )


def test_draws_differ_by_seed_step_and_key():
    base = normal(StepNoise(0, 0, range(GLOBAL), GLOBAL), "prior", (GLOBAL, 4), LIKE)
    for other in (
        normal(StepNoise(1, 0, range(GLOBAL), GLOBAL), "prior", (GLOBAL, 4), LIKE),
        normal(StepNoise(0, 1, range(GLOBAL), GLOBAL), "prior", (GLOBAL, 4), LIKE),
        normal(StepNoise(0, 0, range(GLOBAL), GLOBAL), "encoder", (GLOBAL, 4), LIKE),
    ):
        assert not torch.allclose(base, other)
    assert base.std().item() == pytest.approx(1.0, abs=0.35)


def test_truncated_normal_matches_torch_distribution():
    """Inverse-CDF truncation at two deviations: the bound holds and the deviation is 0.8796 sigma (the truncated
    normal's), as torch.nn.init.trunc_normal_ gives."""
    torch.manual_seed(0)
    draws = truncated_normal(None, "input", torch.empty(400_000, dtype=torch.float64), 0.5)
    reference = torch.nn.init.trunc_normal_(torch.empty(400_000, dtype=torch.float64), 0.0, 0.5, -1.0, 1.0)
    assert draws.abs().max() <= 1.0 and draws.std().item() == pytest.approx(reference.std().item(), rel=0.01)


KINDS = [("gaussian", "gaussian", "gaussian"), ("implicit", "deterministic", "box")]  # encoder, decoder, prior


@pytest.mark.parametrize(("encoder", "decoder", "prior"), KINDS)
def test_a_step_split_over_processes_draws_what_one_process_draws(encoder, decoder, prior):
    """The POT objective of a global batch in one piece and in three (as three ranks would run it, float64, a
    network without batch norm, input noise, a random encoder and decoder): each sample's code, prior sample and
    cost are the same."""
    torch.manual_seed(0)
    model = build_autoencoder(
        mlp.SPEC, MLPConfig(hidden=[16]), (1, 8, 8), Prior(prior, 3), encoder, decoder, 4, input_noise=0.05
    ).double()
    x = torch.rand(GLOBAL, 1, 8, 8, dtype=torch.float64)
    penalty = SlicedPenalty(projections=6, p=2.0, scope="local")

    def terms(rows: range):
        noise = StepNoise(5, 2, rows, GLOBAL)
        cost = lambda a, r, noise=None: reconstruction_cost(a, r, "l2sq", noise=noise)  # noqa: E731
        out = pot_objective(model, model.prior, cost, penalty, 1.0, x[rows.start : rows.stop], noise)
        return out.out.codes.z, out.z_prior, cost(x[rows.start : rows.stop], out.out.recon, noise)

    whole = terms(range(GLOBAL))
    pieces = [terms(rows) for rows in splits(3, 1)]
    for k in range(3):
        torch.testing.assert_close(torch.cat([p[k] for p in pieces]), whole[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("encoder", "decoder", "prior"), KINDS)
def test_the_step_draws_are_traced_by_torch_compile(encoder, decoder, prior):
    """train.compile compiles the auto-encoder, whose forward draws the step's noise: Dynamo traces it (the
    generators' seeding, a hash of Python integers, is left to Python) and the traced forward draws what
    the eager one draws. The eager backend: tracing is what can fail here, and it needs no compiler."""
    torch._dynamo.reset()
    model = build_autoencoder(
        mlp.SPEC, MLPConfig(hidden=[16]), (1, 8, 8), Prior(prior, 3), encoder, decoder, 4, input_noise=0.05
    )
    x, noise = torch.rand(GLOBAL, 1, 8, 8), StepNoise(5, 2, range(GLOBAL), GLOBAL)
    eager, traced = model(x, noise), torch.compile(model, backend="eager", fullgraph=False)(x, noise)
    assert torch.equal(traced.codes.z, eager.codes.z)
    assert torch.equal(traced.recon.logits, eager.recon.logits)


def test_seeds_of_different_draws_differ_and_stay_in_63_bits():
    """mix_seed gives every (seed, step or epoch, what is drawn) its own seed: 30,000 neighbouring tuples, the
    same values in another order, and negative or 64-bit values, all distinct and in [0, 2^63)."""
    tuples = [(seed, step, key) for seed in (0, 1, 2**40) for step in range(2000) for key in range(5)]
    tuples += [(key, step, seed) for seed, step, key in tuples[:100]] + [(-1, 0, 0), (2**64 - 1, 0, 0)]
    seeds = [mix_seed(*t) for t in tuples]
    assert len(set(seeds)) == len(set(tuples))
    assert all(0 <= s < 2**63 for s in seeds)
