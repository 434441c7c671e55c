"""Multi-process checks of distributed training math: the global MMD and its gradients under DDP."""

from __future__ import annotations

import torch

from tests.multiproc.harness import Context, check
from vegan_scale.models.outputs import LatentCodes
from vegan_scale.penalties.kernel_mmd import MMDPenalty, global_mmd, mmd


def _rank_data(ctx: Context, n: int, d: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's codes and prior samples, generated identically on every rank from one seed."""
    g = torch.Generator().manual_seed(7)
    codes = [torch.randn(n, d, generator=g, dtype=dtype) * 1.3 + 0.4 for _ in range(ctx.world_size)]
    prior = [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(ctx.world_size)]
    return codes, prior


def _global_vs_concatenated(ctx: Context, dtype: torch.dtype, kernel: str) -> dict:
    codes, prior = _rank_data(ctx, n=6, d=3, dtype=dtype)
    z = codes[ctx.rank].clone().requires_grad_(True)
    value = global_mmd(z, prior[ctx.rank], kernel, sigma2=1.5)
    (grad,) = torch.autograd.grad(value, z)
    z_all = torch.cat(codes).requires_grad_(True)  # one process's view of the whole global batch
    reference = mmd(z_all, torch.cat(prior), kernel, sigma2=1.5)
    (grad_all,) = torch.autograd.grad(reference, z_all)
    mine = grad_all[ctx.rank * 6 : (ctx.rank + 1) * 6]
    return {
        "value_rel": abs((value - reference) / reference).item(),
        "grad_rel": ((grad - mine).norm() / mine.norm()).item(),
        "dtype": str(value.dtype),
    }


@check
def global_mmd_float64(ctx: Context) -> dict:
    """global_mmd over 2 processes vs mmd of the concatenated batch in one process, float64, both kernels."""
    return {k: _global_vs_concatenated(ctx, torch.float64, k) for k in ("imq", "rbf")}


@check
def global_mmd_float32(ctx: Context) -> dict:
    """The same comparison in float32."""
    return {k: _global_vs_concatenated(ctx, torch.float32, k) for k in ("imq", "rbf")}


@check
def global_mmd_parameter_grads_under_ddp(ctx: Context) -> dict:
    """Parameter gradients through a DDP-wrapped encoder with the global penalty equal one process's gradients
    of the same penalty on the whole batch, although DDP averages gradients over processes."""
    n, d_in, d = 5, 4, 3
    g = torch.Generator().manual_seed(11)
    x = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for _ in range(ctx.world_size)]
    prior = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(ctx.world_size)]
    torch.manual_seed(3)
    encoder = torch.nn.Linear(d_in, d).double()
    reference = torch.nn.Linear(d_in, d).double()
    reference.load_state_dict(encoder.state_dict())
    wrapped = ctx.accelerator.prepare(encoder)
    penalty = MMDPenalty("imq", sigma2=1.0, scope="global")
    value = penalty(LatentCodes(z=wrapped(x[ctx.rank])), prior[ctx.rank])
    ctx.accelerator.backward(value)
    expected = mmd(reference(torch.cat(x)), torch.cat(prior), "imq", 1.0)
    expected.backward()
    rel = [
        ((p.grad - q.grad).norm() / q.grad.norm()).item()
        for p, q in zip(encoder.parameters(), reference.parameters(), strict=True)
    ]
    return {"value_rel": abs((value - expected) / expected).item(), "grad_rel": max(rel)}


class _FixedPrior:
    """A prior whose samples are given in advance, so two process layouts can use the same draws."""

    def __init__(self, samples: torch.Tensor) -> None:
        self.samples = samples

    def sample(self, n: int, device: object = None, **_: object) -> torch.Tensor:
        assert n == len(self.samples)
        return self.samples


def _one_step(ctx: Context, penalty_kind: str) -> dict:
    """One SGD step of the real step code on half a global batch per process, against one process on all of it."""
    from functools import partial

    from vegan_scale.costs import reconstruction_cost
    from vegan_scale.distributed import trainable
    from vegan_scale.engine.objective import pot_objective
    from vegan_scale.experiment import load_experiment
    from vegan_scale.registry import build_model, build_penalty

    cfg = load_experiment(
        None,
        [
            "model.network=mlp",
            "model.mlp.hidden=[12]",
            "model.latent_dim=3",
            "data.image_size=4",
            f"penalty.kind={penalty_kind}",
            "penalty.adversarial.hidden=8",
            "penalty.adversarial.layers=2",
        ],
    )
    g = torch.Generator().manual_seed(5)
    n = 6
    x = torch.rand(2 * n, 1, 4, 4, generator=g, dtype=torch.float64)
    z_prior = torch.randn(2 * n, 3, generator=g, dtype=torch.float64)
    cost = partial(reconstruction_cost, kind="l2sq", scale=None)

    def build() -> tuple:
        torch.manual_seed(0)
        model, penalty = build_model(cfg).double(), build_penalty(cfg)
        if penalty.critic is not None:
            penalty.critic.double()
        return model, penalty

    def step(ae, critic, penalty, xs, ps) -> None:
        modules = [ae.module] + ([critic.module] if critic else [])
        with ctx.accelerator.accumulate(*modules):
            terms = pot_objective(ae.module, _FixedPrior(ps), cost, penalty, 10.0, xs)
            ae.backward(terms.loss)
            ae.step(0.1)
            if critic is not None:
                critic.backward(penalty.critic_loss(critic.module, terms.out.codes.z.detach(), terms.z_prior))
                critic.step(0.1)

    model, penalty = build()
    ae = trainable.prepare(ctx.accelerator, "autoencoder", model, torch.optim.SGD(model.parameters(), lr=0.1))
    critic = None
    if penalty.critic is not None:
        critic = trainable.prepare(
            ctx.accelerator, "critic", penalty.critic, torch.optim.SGD(penalty.critic.parameters(), lr=0.1)
        )
        penalty.use_critic(critic.frozen_parameters)
    mine = slice(ctx.rank * n, (ctx.rank + 1) * n)
    step(ae, critic, penalty, x[mine], z_prior[mine])

    ref_model, ref_penalty = build()  # one process, the whole global batch, plain modules
    ref_ae = trainable.Trainable(
        "autoencoder", ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1), _Local(ctx.accelerator)
    )
    ref_critic = None
    if ref_penalty.critic is not None:
        ref_critic = trainable.Trainable(
            "critic",
            ref_penalty.critic,
            torch.optim.SGD(ref_penalty.critic.parameters(), lr=0.1),
            _Local(ctx.accelerator),
        )
    with _no_process_group():
        step(ref_ae, ref_critic, ref_penalty, x, z_prior)

    def rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
        return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters(), strict=True))

    result = {"autoencoder": rel(ae.raw, ref_model)}
    if critic is not None:
        result["critic"] = rel(critic.raw, ref_penalty.critic)
    return result


class _Local:
    """The parts of an Accelerator a Trainable uses, for plain single-process modules (the reference)."""

    def __init__(self, accelerator: object) -> None:
        self.distributed_type = "NO"
        self.sync_gradients = True
        self.is_main_process = True
        self.accumulate = accelerator.accumulate

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unwrap_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


class _no_process_group:
    """Make torch.distributed look uninitialised, so the global MMD falls back to one process's estimator."""

    def __enter__(self) -> None:
        self.saved = torch.distributed.is_initialized
        torch.distributed.is_initialized = lambda: False

    def __exit__(self, *exc: object) -> None:
        torch.distributed.is_initialized = self.saved


@check
def one_step_wae_mmd_matches_one_process(ctx: Context) -> dict:
    """WAE-MMD with the global MMD: the step on 2 x half the batch equals the step on the batch (float64, SGD)."""
    return _one_step(ctx, "mmd")


@check
def one_step_wae_gan_matches_one_process(ctx: Context) -> dict:
    """WAE-GAN (auto-encoder and critic, separately wrapped): the same equivalence for both modules."""
    return _one_step(ctx, "adversarial")


@check
def ranks_end_with_identical_parameters(ctx: Context) -> dict:
    """Twenty WAE-GAN steps on different data per rank: every rank ends with bit-identical parameters."""
    from vegan_scale.distributed import trainable
    from vegan_scale.engine.objective import pot_objective
    from vegan_scale.experiment import load_experiment
    from vegan_scale.registry import build_model, build_penalty, build_prior

    cfg = load_experiment(
        None,
        [
            "model.network=mlp",
            "model.mlp.hidden=[16]",
            "data.image_size=8",
            "penalty.kind=adversarial",
            "penalty.adversarial.hidden=8",
        ],
    )
    torch.manual_seed(0)
    model, penalty, prior = build_model(cfg), build_penalty(cfg), build_prior(cfg)
    ae = trainable.prepare(ctx.accelerator, "autoencoder", model, torch.optim.Adam(model.parameters(), 1e-3))
    critic = trainable.prepare(
        ctx.accelerator, "critic", penalty.critic, torch.optim.Adam(penalty.critic.parameters(), 1e-3)
    )
    penalty.use_critic(critic.frozen_parameters)
    torch.manual_seed(100 + ctx.rank)  # different data and prior draws on each rank
    from functools import partial

    from vegan_scale.costs import reconstruction_cost

    for _ in range(20):
        x = torch.rand(8, 1, 8, 8)
        with ctx.accelerator.accumulate(ae.module, critic.module):
            terms = pot_objective(ae.module, prior, partial(reconstruction_cost, kind="l2sq"), penalty, 10.0, x)
            ae.backward(terms.loss)
            ae.step(1e-3)
            critic.backward(penalty.critic_loss(critic.module, terms.out.codes.z.detach(), terms.z_prior))
            critic.step(1e-3)
    flat = torch.cat([p.detach().flatten() for m in (ae.raw, critic.raw) for p in m.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(gathered, flat)
    return {"identical": all(torch.equal(gathered[0], t) for t in gathered), "size": flat.numel()}


@check
def global_sliced_wasserstein_float64(ctx: Context) -> dict:
    """SW_2^2 over two processes' codes equals one process's on the concatenation (same directions): value and this
    rank's code gradients, float64; the penalty (directions drawn on rank 0 and shared) agrees on every rank."""
    from vegan_scale.models.outputs import LatentCodes
    from vegan_scale.penalties.sliced import SlicedPenalty, global_sliced_wasserstein, sliced_wasserstein

    g = torch.Generator().manual_seed(11)
    n, d = 6, 3
    z_all = torch.randn(2 * n, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
    p_all = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.randn(7, d, generator=g, dtype=torch.float64), dim=1)
    mine = slice(ctx.rank * n, (ctx.rank + 1) * n)
    z = z_all[mine].clone().requires_grad_()
    value = global_sliced_wasserstein(z, p_all[mine], directions, 2.0)
    value.backward()
    ref_z = z_all.clone().requires_grad_()
    ref = sliced_wasserstein(ref_z, p_all, directions, 2.0)
    ref.backward()
    torch.manual_seed(100 + ctx.rank)  # different local random streams: the shared directions must win
    penalty = SlicedPenalty(7, 2.0, "global")(LatentCodes(z=z_all[mine]), p_all[mine])
    both = [torch.zeros(()) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(both, penalty.detach().float())
    return {
        "value_rel": abs(value.item() - ref.item()) / abs(ref.item()),
        "grad_rel": ((z.grad - ref_z.grad[mine]).norm() / ref_z.grad[mine].norm()).item(),
        "penalty_agrees": both[0].item() == both[1].item(),
    }


@check
def bf16_gradient_compression(ctx: Context) -> dict:
    """train.grad_compression=bf16 as the trainer wraps a module (trainable.prepare): which hook the DDP module
    carries, and its all-reduced gradients against plain DDP's on the same data."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from vegan_scale.distributed import trainable

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1 + ctx.rank))
    module = copy.deepcopy(base)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    compressed = trainable.prepare(ctx.accelerator, "autoencoder", module, optimizer, grad_compression="bf16").module
    grads = {}
    for name, model in (("bf16", compressed), ("none", DistributedDataParallel(copy.deepcopy(base)))):
        model(x).square().mean().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    scale = grads["none"].abs().max()
    return {
        "hooks": [hook.__name__ for hook, _ in compressed._comm_hooks],  # DDP's record of registered hooks
        "rel": ((grads["bf16"] - grads["none"]).abs().max() / scale).item(),
    }


@check
def bf16_weights_copy_under_ddp(ctx: Context) -> dict:
    """train.low_precision_weights as the trainer wraps a module (trainable.prepare), three AdamW steps under DDP
    with ranks on different data: the first step's gradients (taken with the bf16 copy, all-reduced) against the
    float64 mean of both ranks' gradients at the same (bf16-rounded) weights; afterwards, the masters' precision,
    whether the copy is exactly the masters rounded to bf16, whether batch norm is shared, and the ranks' masters."""
    import copy

    from vegan_scale.distributed import trainable

    torch.manual_seed(0)
    nn = torch.nn
    module = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(10 + r)) for r in range(ctx.world_size)]
    reference = copy.deepcopy(module).double()
    with torch.no_grad():  # the weights the copy computes with: the masters rounded to bf16 (batch norm's stay)
        for name in ("0", "3"):
            for p in reference.get_submodule(name).parameters():
                p.copy_(p.bfloat16())
    for x in data:  # DDP's gradient: the mean over the ranks' losses, each on its own batch statistics
        (reference(x.double()).square().mean() / ctx.world_size).backward()
    wrapped = trainable.prepare(
        ctx.accelerator,
        "autoencoder",
        module,
        torch.optim.AdamW(module.parameters(), lr=1e-3),
        low_precision_weights=True,
    )
    twin = wrapped.low_precision.twin
    error = float("nan")
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped.module(data[ctx.rank]).float().square().mean()
        wrapped.backward(loss)
        if step == 0:  # over all gradients at once (the first layer's bias has none: batch norm removes it)
            mine = torch.cat([p.grad.double().flatten() for p in twin.parameters()])
            mean = torch.cat([p.grad.flatten() for p in reference.parameters()])
            error = ((mine - mean).norm() / mean.norm()).item()
        wrapped.step(1e-3)
    masters = torch.cat([p.detach().flatten() for p in module.parameters()])
    gathered = [torch.empty_like(masters) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(gathered, masters)
    return {
        "grad_rel": error,
        "master_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
        "copy_is_rounded_master": all(
            torch.equal(low, high.detach().to(low.dtype)) for high, low in wrapped.low_precision.pairs
        ),
        "copy_dtypes": sorted({str(p.dtype) for p in twin.parameters()}),
        "norm_shared": twin[1] is module[1],
        "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
        "moved": (masters - torch.cat([p.detach().flatten() for p in reference.parameters()]).float())
        .abs()
        .max()
        .item(),
    }
