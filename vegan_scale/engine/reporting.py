"""What the main process tells the person: the derived quantities at start, progress lines and throughput (each
recorded too), and where to find the results."""

from __future__ import annotations

import logging

from tqdm import tqdm

from vegan_scale.engine.run import Run

log = logging.getLogger("vegan_scale")


def announce(run: Run) -> None:
    """The derived quantities of the run, before the first step."""
    cfg, acc, layout = run.cfg, run.accelerator, run.layout
    raw = run.modules.autoencoder.raw
    params = sum(p.numel() for p in raw.parameters())
    if hasattr(next(raw.parameters()), "ds_numel"):  # ZeRO-3: the local tensors are shards
        params = sum(p.ds_numel for p in raw.parameters())
    log.info("run directory: %s", run.dir.path)
    log.info(
        "%d process(es) (%s) x %d micro-batch(es) of %d = global batch %d; %d steps (%.1f per epoch), %s precision",
        acc.num_processes,
        acc.distributed_type.value,
        layout.accumulation,
        layout.micro,
        layout.global_batch,
        run.steps.total,
        run.steps.per_epoch,
        cfg.train.mixed_precision + (" (bf16 weights copy)" if cfg.train.low_precision_weights else ""),
    )
    log.info(
        "data: %s mode, %d shards, %d loader worker(s) per process, on_error=%s",
        cfg.data.mode,
        len(run.stream.index.urls),
        cfg.data.num_workers,
        cfg.data.on_error,
    )
    log.info(
        "model: %s network, %s encoder, d=%d, %.2fM parameters; penalty %s, weight %g; cost %s",
        cfg.model.network,
        cfg.model.encoder,
        cfg.model.latent_dim,
        params / 1e6,
        run.objective.penalty.describe(),
        run.objective.weight,
        cfg.cost.kind,
    )


def perf_metrics(run: Run, steps: int, elapsed: float, data_time: float, agree_ms: float) -> dict[str, float]:
    return {
        "perf/samples_per_sec": steps * run.layout.global_batch / elapsed,
        "perf/step_ms": 1e3 * elapsed / steps,
        "perf/data_ms": 1e3 * data_time / steps,
        "perf/agree_ms": agree_ms,
    }


# The loss terms a person watches, in this order, with their short names (the critic's only for adversarial ones).
TERMS = {"train/loss": "loss", "train/recon": "recon", "train/penalty": "penalty", "train/critic_loss": "critic"}


def report(run: Run, step: int, values: dict[str, float], progress: tqdm | None) -> None:
    """Record a metric flush; show it on the progress bar (a terminal) or as a log line (a log file)."""
    run.records.metrics(step, values)
    terms = {name: values[key] for key, name in TERMS.items() if key in values}
    throughput = values["perf/samples_per_sec"]
    if progress is not None:
        progress.set_postfix(
            {**{k: f"{v:.4f}" for k, v in terms.items()}, "samples/s": f"{throughput:.0f}"}, refresh=False
        )
        return
    shown = ", ".join(f"{name} {value:.4f}" for name, value in terms.items())
    log.info("step %d/%d: %s, %.0f samples/s", step, run.steps.total, shown, throughput)


def farewell(run: Run) -> None:
    print(f"\nResults: {run.dir.path.resolve()}  (config.yaml, metrics.jsonl, figures/, checkpoints/)")
    if run.records.tracker is not None:
        print(f"MLflow:  {run.records.tracker.ui()}")
