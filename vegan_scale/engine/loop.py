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
from accelerate.utils import gather_object
from tqdm import tqdm

from vegan_scale import checkpoint
from vegan_scale.data.decode import SKIP_REASONS
from vegan_scale.data.pipeline import Batch
from vegan_scale.dist import Agreement, Flag
from vegan_scale.engine import rundir
from vegan_scale.engine.evaluate import evaluate
from vegan_scale.engine.objective import ObjectiveTerms, pot_objective
from vegan_scale.engine.schedule import lr_factor
from vegan_scale.engine.setup import Run, build_run
from vegan_scale.errors import DataError, ExitCode, NonFiniteLossError, VeganError
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
    if run.accelerator.is_main_process:
        _farewell(run)
    return run.run_dir


def _fit(run: Run) -> int:
    cfg, acc = run.cfg, run.accelerator
    agreement, metrics = Agreement(acc), MetricBuffer()
    feed = DataFeed(run, agreement)
    # A progress bar on a terminal; in a log file (SLURM, CI) one line per metric flush instead.
    interactive = acc.is_main_process and sys.stderr.isatty()
    progress = tqdm(total=run.total_steps, disable=not interactive, dynamic_ncols=True, desc="train")
    interval_start, step = time.perf_counter(), 0
    while step < run.total_steps:
        x = feed.next()
        step += 1
        lr_scale = lr_factor((step - 1) / run.stream.batches_per_epoch, cfg.optim.lr_milestones, cfg.optim.lr_factors)

        terms = _autoencoder_step(run, x, lr_scale)
        critic_loss = _critic_step(run, terms, lr_scale) if run.critic is not None else None

        agreement.raise_if(Flag.NONFINITE, ~torch.isfinite(terms.loss))
        metrics.add(_step_metrics(terms, critic_loss))
        progress.update()
        last = step == run.total_steps
        saving = cfg.checkpoint.every_steps and (step % cfg.checkpoint.every_steps == 0 or last)
        if step % cfg.train.check_every == 0 or last or saving:  # never checkpoint what a failure has touched
            _act_on_flags(run, agreement.check(), feed, step)
        if step % cfg.tracking.log_every == 0 or last:
            values, steps = metrics.flush()
            values |= _perf_metrics(run, steps, time.perf_counter() - interval_start, feed, agreement, lr_scale)
            _report(run, step, values, progress if interactive else None)
            interval_start = time.perf_counter()
        if step % cfg.eval.every_steps == 0 or last:
            _evaluate(run, step)
        if saving:
            _save_checkpoint(run, step, feed.epoch)
    progress.close()
    return step


class DataFeed:
    """This rank's training batches on the device, epoch after epoch.

    A loader failure (on_error=raise) must not leave the other ranks waiting in a collective: the failing rank
    records the error, raises the DATA_ERROR flag and repeats its last batch until the next agreement check, where
    every rank stops together with the error's message.
    """

    def __init__(self, run: Run, agreement: Agreement) -> None:
        self.run, self.agreement = run, agreement
        self.epoch, self.error = 0, None
        self.data_time, self.skipped = 0.0, torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
        self._batches = self._epochs()
        self._last: torch.Tensor | None = None

    def _epochs(self) -> Iterator[Batch]:
        while True:
            plan = self.run.stream.plan(self.epoch)
            if plan.dropped and self.run.accelerator.is_main_process:
                log.info(
                    "epoch %d: %d samples left unread so that every process gets %d full batches",
                    self.epoch,
                    plan.dropped,
                    plan.batches,
                )
            yield from self.run.stream.epoch(self.epoch)
            self.epoch += 1

    def next(self) -> torch.Tensor:
        start = time.perf_counter()
        device = self.run.accelerator.device
        if self.error is None:
            try:
                images, _, skipped = next(self._batches)
                self.skipped += skipped
                self._last = images.to(device, non_blocking=True).float().div_(255)
            except DataError as e:
                self.error = _worker_message(e)
                self.agreement.raise_if(Flag.DATA_ERROR, torch.ones((), device=device))
        if self._last is None:  # failed before the first batch: any batch of the right shape keeps step
            shape = (self.run.layout.per_process, *self.run.stream.image_shape)
            self._last = torch.zeros(shape, device=device)
        self.data_time += time.perf_counter() - start
        return self._last

    def take_counts(self) -> tuple[float, dict[str, float]]:
        """(seconds spent waiting for data, samples skipped by reason over all ranks) since the last call."""
        skipped = self.skipped.to(self.run.accelerator.device)
        if self.run.accelerator.num_processes > 1:
            torch.distributed.all_reduce(skipped)
        data_time, self.data_time, self.skipped = self.data_time, 0.0, torch.zeros_like(self.skipped)
        counts = {f"data/skipped/{r}": float(n) for r, n in zip(SKIP_REASONS, skipped.tolist(), strict=True) if n}
        return data_time, counts


def _worker_message(error: DataError) -> str:
    """The DataError's own message, without the traceback a DataLoader worker wraps around it."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def _act_on_flags(run: Run, raised: set[Flag], feed: DataFeed, step: int) -> None:
    """Collective: every rank calls it at the same step and raises the same error."""
    if Flag.DATA_ERROR in raised:
        messages = gather_object([f"process {run.accelerator.process_index}: {feed.error}" if feed.error else ""])
        raise DataError("; ".join(m for m in messages if m) + " (data.on_error=skip would skip bad samples)")
    if Flag.NONFINITE in raised:
        raise NonFiniteLossError(_nonfinite_message(run, step))


def _report(run: Run, step: int, values: dict[str, float], progress: tqdm | None) -> None:
    if run.tracker is not None:
        run.tracker.log_metrics(step, values)
    if progress is not None:
        progress.set_postfix(loss=f"{values['train/loss']:.4f}", refresh=False)
        return
    log.info(
        "step %d/%d: loss %.4f, recon %.4f, penalty %.4f, %.0f samples/s",
        step,
        run.total_steps,
        values["train/loss"],
        values["train/recon"],
        values["train/penalty"],
        values["perf/samples_per_sec"],
    )


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
    run: Run, steps: int, elapsed: float, feed: DataFeed, agreement: Agreement, lr_scale: float
) -> dict[str, float]:
    data_time, skipped = feed.take_counts()
    return {
        "train/lr": run.cfg.optim.lr * lr_scale,
        "train/epoch": float(feed.epoch),
        "perf/samples_per_sec": steps * run.layout.global_batch / elapsed,
        "perf/step_ms": 1e3 * elapsed / steps,
        "perf/data_ms": 1e3 * data_time / steps,
        "perf/agree_ms": agreement.last_check_ms,
        **skipped,
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
        run.stream.batches_per_epoch,
        cfg.train.mixed_precision,
    )
    log.info(
        "data: %s mode, %d shards, %d loader worker(s) per process, on_error=%s",
        cfg.data.mode,
        len(run.stream.index.urls),
        cfg.data.num_workers,
        cfg.data.on_error,
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
