"""Multi-process checks of the model evaluation: every process evaluates its share, the result is the whole set's."""

from __future__ import annotations

import torch

from tests.multiproc.harness import Context, check
from vegan_scale.evaluation.classifier import load_classifier
from vegan_scale.evaluation.protocol import EvalResult, EvalSettings, Shares, evaluate
from vegan_scale.experiment import load_experiment
from vegan_scale.registry import build_model

TEST_IMAGES = 38  # halves of 19: blocks of 10 and 9 (padded) over two processes


def evaluate_tiny(shares: Shares) -> EvalResult:
    """A seeded small conv auto-encoder on seeded random images, evaluated with the MNIST feature network."""
    cfg = load_experiment(None, ["model.conv.width=4", "model.latent_dim=3"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randint(0, 256, (TEST_IMAGES, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    settings = EvalSettings(num_samples=TEST_IMAGES, batch_size=4, kid_subsets=5, kid_subset_size=10)
    return evaluate(
        model, images.to(torch.uint8), ("l2sq", None), "imq", load_classifier("mnist"), None, settings, shares
    )


@check
def eval_over_two_processes(ctx: Context) -> dict:
    """The evaluation of every process, and a gather of uneven blocks (7 rows: 4 + 3 padded)."""
    shares = Shares(ctx.rank, ctx.world_size, ctx.accelerator.gather)
    rows = shares.rows(lambda x: torch.stack([x, x * x], dim=1), torch.arange(7, dtype=torch.float64), batch_size=2)
    result = evaluate_tiny(shares)
    return {"model": result.model, "real": result.real, "rows": rows.tolist(), "refusals": _refusals(ctx)}


def _refusals(ctx: Context) -> list[str | None]:
    """`vegan-scale eval`'s check of where eval.json goes, made by the main process and heard by every process: the
    message each process raises for a place under a file, then for a writable place (None: no error)."""
    from vegan_scale.cli import _refuse_unwritable
    from vegan_scale.errors import StorageError

    blocker = ctx.shared_dir / "a_file"
    if ctx.rank == 0:
        blocker.write_text("")
    ctx.accelerator.wait_for_everyone()
    said: list[str | None] = []
    for out in (blocker / "eval.json", ctx.shared_dir / "evals" / "eval.json"):
        try:
            _refuse_unwritable(out, ctx.accelerator, replaces_only_an_evaluation=False)
            said.append(None)
        except StorageError as e:
            said.append(str(e))
    return said
