"""The official WAE code's options (tolstikhin/wae), each against the official formula written here in numpy, in
float64: encoder pre-training's moment loss, the p-trick, the adaptive lambda, the re-encoding order, the
initialisation, the input noise, the [-1, 1] input range, the median RBF bandwidth and the learning-rate
schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.paths import ROOT
from vegan_scale.costs import reconstruction_cost
from vegan_scale.engine.loop import train
from vegan_scale.engine.pretrain import pretrain_encoder
from vegan_scale.engine.schedule import lr_factor
from vegan_scale.errors import NonFiniteLossError
from vegan_scale.experiment import load_experiment
from vegan_scale.models import mlp
from vegan_scale.models.autoencoder import build_autoencoder, init_weights
from vegan_scale.models.options import MLPConfig
from vegan_scale.models.outputs import Reconstruction
from vegan_scale.noise import truncated_normal
from vegan_scale.penalties.adversarial import PriorTrick
from vegan_scale.penalties.kernel_mmd import mmd
from vegan_scale.penalties.moments import moment_matching_loss
from vegan_scale.priors import Prior
from vegan_scale.registry import build_model

RNG = np.random.default_rng(7)


def official_pretrain_loss(qz: np.ndarray, pz: np.ndarray) -> float:
    """wae.py pretrain_loss: squared mean and covariance gaps (covariances / (sample size - 1))."""
    mean_pz, mean_qz = pz.mean(axis=0, keepdims=True), qz.mean(axis=0, keepdims=True)
    mean_loss = np.mean(np.square(mean_pz - mean_qz))
    cov_pz = (pz - mean_pz).T @ (pz - mean_pz) / (len(pz) - 1.0)
    cov_qz = (qz - mean_qz).T @ (qz - mean_qz) / (len(qz) - 1.0)
    return float(mean_loss + np.mean(np.square(cov_pz - cov_qz)))


def test_moment_loss_is_the_official_pretrain_loss() -> None:
    qz, pz = RNG.normal(0.3, 2.0, (50, 6)), RNG.normal(size=(50, 6))
    got = moment_matching_loss(torch.from_numpy(qz), torch.from_numpy(pz)).item()
    assert got == pytest.approx(official_pretrain_loss(qz, pz), rel=1e-12)


def _tiny_autoencoder(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_autoencoder(
        mlp.SPEC,
        MLPConfig(hidden=[32]),
        (1, 8, 8),
        Prior("gaussian", 3),
        "deterministic",
        "deterministic",
        4,
        **options,
    )


def test_pretraining_matches_the_moments_and_is_seeded() -> None:
    """Pre-training brings the codes' moment loss below the official 0.1 (codes initially spread far wider than
    the prior, as a scaled initialisation makes them), and the same seed gives the same encoder."""
    pool = torch.randint(0, 256, (400, 1, 8, 8), dtype=torch.uint8)
    results = []
    for _ in range(2):
        model = _tiny_autoencoder()
        with torch.no_grad():
            model.encoder.head.weight.mul_(30)
        before = moment_matching_loss(model.encode(pool[:200].float() / 255).z, torch.randn(200, 3)).item()
        steps, loss = pretrain_encoder(model, pool, 300, 100, 1e-2, (0.5, 0.999), seed=3)
        results.append((steps, loss, [p.detach().clone() for p in model.encoder.parameters()]))
    assert before > 1.0 and results[0][1] < 0.1 < before and results[0][0] < 300
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))


def test_pretraining_that_diverges_stops_with_the_nonfinite_loss_error() -> None:
    """An exploding learning rate in pre-training is a NonFiniteLossError (exit 65) that names pre-training and
    its remedies, not a NaN encoder handed to training."""
    model = _tiny_autoencoder()
    with pytest.raises(NonFiniteLossError, match=r"encoder pre-training.*train\.encoder_pretrain_steps=0"):
        pretrain_encoder(model, torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8), 50, 25, 1e12, (0.5, 0.999), 0)


def test_pretraining_ends_at_a_stop_request() -> None:
    """A stop asked for during pre-training (SIGTERM at start-up) waited for all its steps, 20 s with a large
    network, close to a launcher's 30 s grace; it ends at the next pre-training step."""
    model, asked = _tiny_autoencoder(), iter([False, False, True])
    pool = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    steps, _ = pretrain_encoder(model, pool, 50, 25, 1e-6, (0.5, 0.999), 0, stopping=lambda: next(asked))
    assert steps == 3


def test_p_trick_adds_the_official_log_density() -> None:
    """models.py z_adversary with gan_p_trick: logits - |z|^2 / 2 / sigma2 - log(2 pi) / 2 - d log(sigma2) / 2,
    each code's own density (the official code broadcasts it to an n x n matrix; see penalties/adversarial.py)."""
    net = torch.nn.Linear(5, 1).double()
    critic, sigma2 = PriorTrick(net, 2.0), 2.0
    z = torch.from_numpy(RNG.normal(size=(7, 5)))
    expected = net(z).detach().numpy()[:, 0] - (z.numpy() ** 2).sum(1) / 2.0 / sigma2
    expected = expected - 0.5 * np.log(2.0 * np.pi) - 0.5 * 5 * np.log(sigma2)
    np.testing.assert_allclose(critic(z).detach().numpy()[:, 0], expected, rtol=1e-12)


def official_rbf_mmd(qz: np.ndarray, pz: np.ndarray) -> float:
    """wae.py mmd_penalty, kernel RBF: the median heuristic, then exp(-d / 2 sigma2_k) over qq+pp off-diagonal
    pairs / (n^2 - n) minus 2 / n^2 over the cross pairs."""
    n = len(qz)
    half = (n * n - n) // 2
    sq = lambda a, b: (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T  # noqa: E731
    d_pz, d_qz, d = sq(pz, pz), sq(qz, qz), sq(qz, pz)
    sigma2_k = np.sort(d.ravel())[::-1][half - 1] + np.sort(d_qz.ravel())[::-1][half - 1]
    res1 = (np.exp(-d_qz / 2 / sigma2_k) + np.exp(-d_pz / 2 / sigma2_k)) * (1 - np.eye(n))
    return float(res1.sum() / (n * n - n) - np.exp(-d / 2 / sigma2_k).sum() * 2 / (n * n))


def test_median_rbf_is_the_official_estimator() -> None:
    qz, pz = RNG.normal(0.5, 1.5, (40, 4)), RNG.normal(size=(40, 4))
    got = mmd(torch.from_numpy(qz), torch.from_numpy(pz), "rbf", bandwidth="median").item()
    assert got == pytest.approx(official_rbf_mmd(qz, pz), rel=1e-10)


def test_median_bandwidth_needs_the_rbf_kernel() -> None:
    from vegan_scale.errors import ConfigError

    with pytest.raises(ConfigError, match=r"penalty\.mmd\.bandwidth=median needs penalty\.mmd\.kernel=rbf"):
        load_experiment(None, ["penalty.mmd.bandwidth=median"])


def test_initialisation_is_the_official_normal() -> None:
    """init_std: normal weights of that deviation (convolutions truncated at two deviations), zero biases."""
    std = 0.0099999
    layers = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 5), torch.nn.Linear(400, 400), torch.nn.ConvTranspose2d(64, 64, 5)
    )
    torch.manual_seed(0)
    init_weights(layers, std)
    conv, linear, deconv = (m.weight.detach() for m in layers)
    assert conv.abs().max() <= 2 * std and conv.std().item() == pytest.approx(0.8796 * std, rel=0.02)
    for w in (linear, deconv):
        assert w.std().item() == pytest.approx(std, rel=0.02) and w.abs().max() > 2 * std
    assert all(torch.count_nonzero(m.bias) == 0 for m in layers)


def test_input_noise_is_truncated_normal_and_training_only() -> None:
    """add_noise: x + TruncatedNormal(0, 0.01) while training, nothing in evaluation."""
    torch.manual_seed(1)
    noise = truncated_normal(None, "input", torch.empty(200_000), 0.01)
    assert noise.abs().max() <= 0.02 and noise.std().item() == pytest.approx(0.8796 * 0.01, rel=0.01)
    model = _tiny_autoencoder(input_noise=0.01)
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model.encode(x).z, model.encode(x).z)
    model.train()
    assert not torch.equal(model.encode(x).z, model.encode(x).z)


def test_symmetric_range_quadruples_the_squared_cost() -> None:
    """[-1, 1] data (input_normalize_sym): the same images and reconstructions cost four times as much in l2sq,
    which is why the CelebA recipe's lambda needs this range; the model takes and returns images in [0, 1]."""
    x01 = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    logits = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    unit = reconstruction_cost(x01, Reconstruction(logits), "l2sq")
    mean01 = torch.sigmoid(logits)
    sym_logits = torch.atanh(2 * mean01 - 1)  # the tanh decoder's logits of the same images
    symmetric = reconstruction_cost(2 * x01 - 1, Reconstruction(sym_logits, symmetric=True), "l2sq")
    torch.testing.assert_close(symmetric, 4 * unit, rtol=1e-10, atol=0)
    model = _tiny_autoencoder(symmetric=True)
    out = model.reconstruct(x01.float())
    assert out.min() >= 0 and out.max() <= 1 and model.sample(3).min() >= 0


def test_learning_rate_is_a_tenth_from_epoch_50() -> None:
    """The official manual schedule: decay / 2 at epoch 30, then / 5 at epoch 50."""
    cfg = load_experiment(ROOT / "configs/mnist/wae_mmd.yaml")
    factors = [lr_factor(e, cfg.optim.lr_milestones, cfg.optim.lr_factors) for e in (0, 29.9, 30, 49.9, 50, 99)]
    assert factors == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def _train_tiny(tiny_shards: Path, root: Path, *overrides: str) -> list[dict]:
    cfg = load_experiment(
        ROOT / "configs/mnist/wae_gan.yaml",
        [
            f"data.train={tiny_shards / 'train'}",
            f"data.test={tiny_shards / 'test'}",
            f"run.root={root}",
            "run.name=tiny",
            "model.network=mlp",
            "model.mlp.hidden=[32]",
            "train.global_batch_size=20",
            "tracking.backend=none",
            "tracking.log_every=1",
            "eval.every_steps=100",
            "eval.num_samples=40",
            "eval.grid_size=2",
            "checkpoint.every_steps=0",
            "data.num_workers=0",
            "train.encoder_pretrain_batch=50",
            *overrides,
        ],
    )
    run_dir = train(cfg)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_adaptive_lambda_follows_the_official_update(tiny_shards: Path, tmp_path: Path) -> None:
    """lambda_schedule='adaptive': every 3 steps here (1000 in the official code) lambda <- 0.5 lambda +
    0.5 recon / |penalty| from that step's terms; constant in between."""
    lines = _train_tiny(
        tiny_shards, tmp_path, "train.max_steps=9", "penalty.weight_schedule=adaptive", "penalty.adaptive_every=3"
    )
    weight = 10.0
    for line in (m for m in lines if "train/loss" in m):
        if line["step"] % 3 == 0:
            weight = 0.5 * weight + 0.5 * line["train/recon"] / abs(line["train/penalty"])
        assert line["train/penalty_weight"] == pytest.approx(weight, rel=1e-5), line["step"]
    assert weight != 10.0


def _recording(critic_loss, seen: dict, key: object):
    """``critic_loss`` that also keeps the codes it was given in ``seen[key]``."""

    def record(critic: torch.nn.Module, z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
        seen[key] = z_q
        return critic_loss(critic, z_q, z_p)

    return record


def test_reencoding_gives_the_critic_the_updated_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """penalty.adversarial.reencode: the critic's loss sees the batch encoded by the auto-encoder after its step
    (the official order); without it, the codes of the step's own forward pass."""
    from types import SimpleNamespace

    from vegan_scale.distributed.accelerator import BatchLayout, apply_layout, build_accelerator
    from vegan_scale.engine.modules import build_modules
    from vegan_scale.engine.objective import POT
    from vegan_scale.engine.step import train_step

    seen = {}
    for reencode in (True, False):
        cfg = load_experiment(
            ROOT / "configs/mnist/wae_gan.yaml",
            [
                "model.network=mlp",
                "model.mlp.hidden=[16]",
                "model.input_noise=0",
                f"penalty.adversarial.reencode={reencode}",
            ],
        )
        accelerator = build_accelerator("no")
        layout = BatchLayout.derive(10, 1, None)
        apply_layout(accelerator, layout, "no")
        modules, penalty = build_modules(cfg, accelerator, new=False)
        pot = POT.of(cfg, penalty)
        monkeypatch.setattr(penalty, "critic_loss", _recording(penalty.critic_loss, seen, reencode))
        x = torch.rand(10, 1, 28, 28)
        before = modules.autoencoder.raw.encode(x).z.detach()
        run = SimpleNamespace(cfg=cfg, accelerator=accelerator, layout=layout, modules=modules, objective=pot, step=0)
        train_step(run, SimpleNamespace(next=lambda batch=x: batch), 1.0)
        after = modules.autoencoder.raw.encode(x).z.detach()
        expected = after if reencode else before
        torch.testing.assert_close(seen[reencode], expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(before, after)


def test_every_layer_of_a_recipe_model_is_initialised(tmp_path: Path) -> None:
    """The MNIST recipe's init_std reaches every weight of the auto-encoder (conv and linear layers alike)."""
    torch.manual_seed(0)
    model = build_model(load_experiment(ROOT / "configs/mnist/wae_mmd.yaml", ["model.conv.width=8"]))
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() > 1:
            assert p.std().item() < 0.0099999 * 1.2, name
    assert math.isclose(0.0099999, load_experiment(ROOT / "configs/mnist/wae_mmd.yaml").model.init_std)
