"""The training loop: one step-based loop for every recipe.

Each step: move the batch to the device, estimate the POT objective, step the auto-encoder; for adversarial
penalties, step the latent critic on the same codes. At visible points: agree across ranks (non-finite loss),
flush metrics, evaluate, checkpoint. The run closes its tracker and writes its exit status in ``finally``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vegan_scale import checkpoint
from vegan_scale.data.pipeline import Batch
from vegan_scale.dist import Agreement, Flag
from vegan_scale.engine import rundir
from vegan_scale.engine.evaluate import evaluate
from vegan_scale.engine.objective import ObjectiveTerms, pot_objective
from vegan_scale.engine.schedule import lr_factor
from vegan_scale.engine.setup import Run, build_run
from vegan_scale.errors import ExitCode, NonFiniteLossError, VeganError
from vegan_scale.tracking import MetricBuffer, ui_command

log = logging.getLogger("vegan_scale")


def train(cfg: Any) -> Path:
    """Train the experiment ``cfg`` describes; returns its run directory. Raises VeganError subclasses."""
    run = build_run(cfg)
    code, reason, step = ExitCode.CRASH, "crashed", 0
    try:
        _announce(run)
        step = _fit(run)
        code, reason = ExitCode.OK, "finished"
    except VeganError as e:
        code, reason = e.exit_code, str(e)
        raise
    except KeyboardInterrupt:
        code, reason = ExitCode.CRASH, "interrupted"
        raise
    finally:
        if run.tracker is not None:
            run.tracker.close("FINISHED" if code == ExitCode.OK else "FAILED")
        if run.accelerator.is_main_process:
            rundir.write_exit_status(run.run_dir, int(code), reason, step)
        run.accelerator.end_training()
    if run.accelerator.is_main_process:
        _farewell(run)
    return run.run_dir


def _fit(run: Run) -> int:
    cfg, acc = run.cfg, run.accelerator
    agreement, metrics = Agreement(acc), MetricBuffer()
    # A progress bar on a terminal; in a log file (SLURM, CI) one line per metric flush instead.
    interactive = acc.is_main_process and sys.stderr.isatty()
    progress = tqdm(total=run.total_steps, disable=not interactive, dynamic_ncols=True, desc="train")
    interval_start, data_time, step = time.perf_counter(), 0.0, 0
    batches = _batches(run)
    while step < run.total_steps:
        fetch_start = time.perf_counter()
        epoch, (images, _) = next(batches)
        data_time += time.perf_counter() - fetch_start
        step += 1
        x = images.to(acc.device, non_blocking=True).float().div_(255)
        lr_scale = lr_factor((step - 1) / run.steps_per_epoch, cfg.optim.lr_milestones, cfg.optim.lr_factors)

        terms = _autoencoder_step(run, x, lr_scale)
        critic_loss = _critic_step(run, terms, lr_scale) if run.critic is not None else None

        agreement.raise_if(Flag.NONFINITE, ~torch.isfinite(terms.loss))
        metrics.add(_step_metrics(terms, critic_loss))
        progress.update()
        last = step == run.total_steps
        if (step % cfg.train.check_every == 0 or last) and Flag.NONFINITE in agreement.check():
            raise NonFiniteLossError(_nonfinite_message(run, step))
        if step % cfg.tracking.log_every == 0 or last:
            elapsed = time.perf_counter() - interval_start
            values, steps = metrics.flush()
            values |= _perf_metrics(run, steps, elapsed, data_time, agreement, epoch, lr_scale)
            if run.tracker is not None:
                run.tracker.log_metrics(step, values)
            if interactive:
                progress.set_postfix(loss=f"{values['train/loss']:.4f}", refresh=False)
            else:
                log.info(
                    "step %d/%d: loss %.4f, recon %.4f, penalty %.4f, %.0f samples/s",
                    step,
                    run.total_steps,
                    values["train/loss"],
                    values["train/recon"],
                    values["train/penalty"],
                    values["perf/samples_per_sec"],
                )
            interval_start, data_time = time.perf_counter(), 0.0
        if step % cfg.eval.every_steps == 0 or last:
            _evaluate(run, step)
        if cfg.checkpoint.every_steps and (step % cfg.checkpoint.every_steps == 0 or last):
            _save_checkpoint(run, step, epoch)
    progress.close()
    return step


def _batches(run: Run) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) for ever; every rank yields the same number of batches per epoch."""
    epoch = 0
    while True:
        plan = run.stream.plan(epoch)
        if plan.dropped:
            log.info(
                "epoch %d: %d samples of this process's shards left unread to keep all processes equal",
                epoch,
                plan.dropped,
            )
        for batch in run.stream.epoch(epoch):
            yield epoch, batch
        epoch += 1


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _autoencoder_step(run: Run, x: torch.Tensor, lr_scale: float) -> ObjectiveTerms:
    cfg = run.cfg
    _set_lr(run.optimizer, cfg.optim.lr * lr_scale)
    with run.accelerator.autocast():
        terms = pot_objective(run.model, run.prior, run.cost, run.penalty, cfg.penalty.weight, x)
    run.accelerator.backward(terms.loss)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return terms


def _critic_step(run: Run, terms: ObjectiveTerms, lr_scale: float) -> torch.Tensor:
    """One step of the latent critic on this batch's codes (detached) and prior sample."""
    _set_lr(run.critic_optimizer, run.cfg.penalty.adversarial.lr * lr_scale)
    with run.accelerator.autocast():
        loss = run.penalty.critic_loss(run.critic, terms.out.codes.z.detach(), terms.z_prior)
    run.accelerator.backward(loss)
    run.critic_optimizer.step()
    run.critic_optimizer.zero_grad(set_to_none=True)
    return loss


def _step_metrics(terms: ObjectiveTerms, critic_loss: torch.Tensor | None) -> dict[str, torch.Tensor]:
    values = {"train/loss": terms.loss, "train/recon": terms.reconstruction, "train/penalty": terms.penalty}
    if critic_loss is not None:
        values["train/critic_loss"] = critic_loss
    return values


def _perf_metrics(
    run: Run, steps: int, elapsed: float, data_time: float, agreement: Agreement, epoch: int, lr_scale: float
) -> dict[str, float]:
    return {
        "train/lr": run.cfg.optim.lr * lr_scale,
        "train/epoch": float(epoch),
        "perf/samples_per_sec": steps * run.layout.global_batch / elapsed,
        "perf/step_ms": 1e3 * elapsed / steps,
        "perf/data_ms": 1e3 * data_time / steps,
        "perf/agree_ms": agreement.last_check_ms,
    }


def _evaluate(run: Run, step: int) -> None:
    """Main process: test reconstruction error and figures, saved in the run directory and sent to the tracker."""
    if not run.accelerator.is_main_process:
        return
    cfg = run.cfg
    result = evaluate(
        run.unwrapped_model, run.cost, run.eval_images, run.prior_noise, cfg.eval.grid_size, run.layout.per_process
    )
    figures = {"samples": result.samples, "reconstructions": result.reconstructions}
    for key, image in figures.items():
        path = run.run_dir / "figures" / f"{key}_{step:08d}.png"
        image.save(path)
        if run.tracker is not None:
            run.tracker.log_figure(step, key, path)
    if run.tracker is not None:
        run.tracker.log_metrics(step, result.metrics)
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))


def _save_checkpoint(run: Run, step: int, epoch: int) -> None:
    """Every process writes its part, then the main process completes and publishes the checkpoint."""
    acc, root = run.accelerator, run.run_dir / "checkpoints"
    start = time.perf_counter()
    checkpoint.write_rank_state(root, step, acc.process_index)
    acc.wait_for_everyone()
    if acc.is_main_process:
        critic = acc.unwrap_model(run.critic).state_dict() if run.critic is not None else None
        optim = {"autoencoder": run.optimizer.state_dict()}
        if run.critic_optimizer is not None:
            optim["critic"] = run.critic_optimizer.state_dict()
        state = {
            "step": step,
            "epoch": epoch,
            "samples_seen": step * run.layout.global_batch,
            "world_size": acc.num_processes,
            "mlflow_run_id": run.tracker.run_id if run.tracker else None,
        }
        checkpoint.write_main_state(
            root, step, checkpoint.CheckpointContent(run.unwrapped_model.state_dict(), critic, optim, state)
        )
        path = checkpoint.commit(root, step, run.cfg.checkpoint.keep_last_k)
        log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - start)
    acc.wait_for_everyone()


def _nonfinite_message(run: Run, step: int) -> str:
    saved = checkpoint.complete_checkpoints(run.run_dir / "checkpoints")
    last = f"the last complete checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
    return (
        f"the loss became NaN or infinite within the {run.cfg.train.check_every} steps before step {step}; "
        f"{last}. Try a lower optim.lr or penalty.weight, or train.mixed_precision=no"
    )


def _announce(run: Run) -> None:
    cfg, acc = run.cfg, run.accelerator
    params = sum(p.numel() for p in run.unwrapped_model.parameters())
    log.info("run directory: %s", run.run_dir)
    log.info(
        "%d process(es) (%s) x %d samples = global batch %d; %d steps (%d per epoch), %s precision",
        acc.num_processes,
        acc.distributed_type.value,
        run.layout.per_process,
        run.layout.global_batch,
        run.total_steps,
        run.steps_per_epoch,
        cfg.train.mixed_precision,
    )
    log.info(
        "model: %s network, %s encoder, d=%d, %.2fM parameters; penalty %s (weight %g), cost %s",
        cfg.model.network,
        cfg.model.encoder,
        cfg.model.latent_dim,
        params / 1e6,
        cfg.penalty.kind,
        cfg.penalty.weight,
        cfg.cost.kind,
    )


def _farewell(run: Run) -> None:
    print(f"\nResults: {run.run_dir.resolve()}  (config.yaml, metrics.jsonl, figures/, checkpoints/)")
    if run.tracking_uri:
        print(f"MLflow:  {ui_command(run.tracking_uri)}")
