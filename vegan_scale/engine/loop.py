"""The training loop: one step-based loop for every recipe and every distribution mode.

Each step estimates the POT objective over this process's micro-batches and steps the auto-encoder (and, for
adversarial penalties, the latent critic): see ``engine.step``. At visible points: agree across ranks (a non-finite
loss, a loader failure), flush metrics, evaluate, checkpoint. The run closes its tracker and writes its exit status
in ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from tqdm import tqdm

from vegan_scale import checkpoint, export, logs
from vegan_scale.config.load import to_yaml
from vegan_scale.distributed.accelerator import distribution_mode
from vegan_scale.distributed.agreement import Agreement, Flag
from vegan_scale.distributed.whereabouts import lost_peer
from vegan_scale.engine import job, reporting, verdict
from vegan_scale.engine.feed import DataFeed
from vegan_scale.engine.metric_buffer import MetricBuffer
from vegan_scale.engine.periodic_eval import evaluate
from vegan_scale.engine.run import Run, build_run
from vegan_scale.engine.schedule import lr_factor
from vegan_scale.engine.step import train_step
from vegan_scale.errors import (
    RESUME,
    ExitCode,
    InterruptedRunError,
    LostRankError,
    PreemptedError,
    StorageError,
    exit_status,
    in_the_way,
)
from vegan_scale.evaluation import grids
from vegan_scale.experiment import stall_timeout_s
from vegan_scale.rundir import checkpoint_name
from vegan_scale.stops import Stop, StopRequests
from vegan_scale.tracking.mlflow_run import final_status

log = logging.getLogger("vegan_scale")


def train(cfg: Any, stops: StopRequests | None = None) -> Path:
    """Train the experiment ``cfg`` describes; returns its run directory. Raises VeganError subclasses.

    ``stops``: the stop requests of this process, collected from its start (the CLI installs them before anything
    heavy is imported); by default they are collected from here on.
    """
    with contextlib.ExitStack() as stack:
        stops = stops or stack.enter_context(StopRequests())
        with logs.held() as earlier:  # train.log does not exist before the run is built
            run = build_run(cfg, stops.since, stops.asked)
        stops.watch(run.dir.stop_request)
        main = run.accelerator.is_main_process
        with logs.to_file(run.dir.train_log, earlier) if main else contextlib.nullcontext():
            _run_to_the_end(run, stops)
    if main:
        reporting.farewell(run)
    return run.dir.path


def _run_to_the_end(run: Run, stops: StopRequests) -> None:
    """Announce, fit, and whatever happens, write the exit status and close the records; errors propagate."""
    code, reason = int(ExitCode.CRASH), "crashed"
    try:
        reporting.announce(run)
        _fit(run, stops)
        code, reason = int(ExitCode.OK), "finished"
    except (torch.distributed.DistError, RuntimeError) as e:
        if run.accelerator.num_processes == 1 or not lost_peer(e):
            code, reason = exit_status(e)
            raise
        code, reason = int(ExitCode.LOST_RANK), _lost_peer_reason(run, e)
        raise LostRankError(f"{reason}; {verdict.kept(run)}") from e
    except BaseException as e:
        code, reason = exit_status(e)
        raise
    finally:
        # the status first: under a launcher, other processes ending may get this one killed before long
        if run.accelerator.is_main_process:
            try:
                run.dir.write_exit_status(code, reason, run.step)
            except OSError as e:  # a full disk must not hide the error that ended the run behind this one
                log.error("could not write %s: %s", run.dir.exit_status, e)
        run.records.close(final_status(code))
        if run.lock is not None:
            run.lock.close()


def _lost_peer_reason(run: Run, error: Exception) -> str:
    """Every process that can: report where it was (run_dir/ranks/); the main process also names the ranks that
    never reported (stopped or dead), with their last heartbeat."""
    where = run.where
    where.report_timeout(error)
    missing = where.missing() if run.accelerator.is_main_process else ""
    return (
        f"another process stopped answering during the {where.phase} of step {where.step}"
        f"{f': {missing}' if missing else ''} ({str(error).splitlines()[0]}); what each process was doing, with "
        f"its stack, is in {where.directory}"
    )


def _fit(run: Run, stops: StopRequests) -> None:
    cfg, acc = run.cfg, run.accelerator
    if run.steps.start > run.steps.total and acc.is_main_process:  # nothing to train: said, not taken for a finish
        log.warning(
            "the run is at step %d, past its end at step %d (train.max_steps or train.epochs): nothing is trained, "
            "and the export holds step %d",
            run.steps.start,
            run.steps.total,
            run.steps.start,
        )
    agreement = Agreement(acc.device, acc.num_processes)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    feed = DataFeed(
        run.stream,
        agreement,
        acc.device,
        acc.is_main_process,
        run.steps.start * run.layout.accumulation,
        layout,
        stall_timeout_s(cfg),
        cfg.data.input_range == "symmetric",
        stops.asked,
    )
    # A progress bar on a terminal; in a log file (SLURM, CI) one line per metric flush instead.
    interactive = acc.is_main_process and sys.stderr.isatty()
    progress = tqdm(
        total=run.steps.total, initial=run.steps.start, disable=not interactive, dynamic_ncols=True, desc="train"
    )
    interval = _Interval(run, feed, progress if interactive else None)
    step = run.steps.start
    run.step = step
    try:
        # a stop asked for while the run started
        _stop_if(run, verdict.agree(run, agreement, stops, feed, step), feed, step)
        while step < run.steps.total:
            lr_scale = lr_factor(step / run.steps.per_epoch, cfg.optim.lr_milestones, cfg.optim.lr_factors)
            run.where.at(step + 1, "training step (forward, backward, gradient all-reduce)")
            terms = train_step(run, feed, lr_scale)
            step += 1
            run.step = step

            for flag, key in verdict.NONFINITE_TERMS.items():
                if key in terms:
                    agreement.raise_if(flag, ~torch.isfinite(terms[key]), step)
            if cfg.penalty.weight_schedule == "adaptive" and step % cfg.penalty.adaptive_every == 0:
                _adapt_weight(run, terms)
            interval.metrics.add(terms)
            progress.update()
            last = step == run.steps.total
            saving = cfg.checkpoint.every_steps and (step % cfg.checkpoint.every_steps == 0 or last)
            stop = None
            if step % cfg.train.check_every == 0 or last or saving:  # never checkpoint what a failure has touched
                if saving:
                    for module in run.modules:
                        agreement.raise_if(Flag.NONFINITE_PARAMS, ~module.parameters_finite(), step)
                stop = verdict.agree(run, agreement, stops, feed, step)
            # A checkpoint's steps are all in the records (metrics, a due evaluation): a continuation starts after.
            if step % cfg.tracking.log_every == 0 or last or saving or stop:
                interval.flush(step, lr_scale)
            if step % cfg.eval.every_steps == 0 or last:
                _evaluate(run, step)
            # A stop at the last step: the run has ended, and finishing writes its export (exit 0) where stopping
            # would leave another attempt to start only to export.
            _stop_if(run, None if last else stop, feed, step)
            if saving:
                _save_checkpoint(run, step, feed.epoch)
                if not last:  # a stop asked while it was written ends the run on it, not on one more
                    _stop_if(run, verdict.agree(run, agreement, stops, feed, step), feed, step, saved=True)
    finally:
        feed.close()
        progress.close()
    _export(run)


def _adapt_weight(run: Run, terms: dict[str, torch.Tensor]) -> None:
    """Collective: the official adaptive lambda, lambda <- 0.5 lambda + 0.5 recon / |penalty|, from this step's terms
    averaged over every rank (so that every rank keeps the same lambda)."""
    both = torch.stack([terms["train/recon"], terms["train/penalty"]]).double()
    if run.accelerator.num_processes > 1:
        torch.distributed.all_reduce(both)
        both /= run.accelerator.num_processes
    recon, penalty = both.tolist()
    if penalty != 0:
        run.objective.weight = 0.5 * run.objective.weight + 0.5 * recon / abs(penalty)
        log.info("penalty weight (adaptive lambda) now %.4g", run.objective.weight)


class _Interval:
    """The metrics since the last flush, and the time they took."""

    def __init__(self, run: Run, feed: DataFeed, progress: tqdm | None) -> None:
        self.run, self.feed, self.progress = run, feed, progress
        self.metrics = MetricBuffer()
        self.start = time.perf_counter()

    def flush(self, step: int, lr_scale: float) -> None:
        """Collective: the interval's means over every rank, with its rates, recorded at ``step``."""
        run, acc = self.run, self.run.accelerator
        run.where.at(step, "metrics all-reduce")
        values, steps = self.metrics.flush(lambda t: acc.reduce(t, "mean") if acc.num_processes > 1 else t)
        data_time, skipped = self.feed.take_counts(acc.num_processes)
        elapsed = time.perf_counter() - self.start
        values |= {"train/lr": run.cfg.optim.lr * lr_scale, "train/epoch": float(self.feed.epoch), **skipped}
        values["train/penalty_weight"] = run.objective.weight
        values |= reporting.perf_metrics(run, steps, elapsed, data_time, self.feed.agreement.last_check_ms)
        reporting.report(run, step, values, self.progress)
        self.start = time.perf_counter()


def _stop_if(run: Run, stop: Flag | None, feed: DataFeed, step: int, saved: bool = False) -> None:
    """Collective: on an agreed stop, checkpoint step ``step`` (unless ``saved``) and raise its error."""
    if stop is None:
        return
    error, what = (InterruptedRunError, Stop.INTERRUPT) if stop == Flag.INTERRUPT else (PreemptedError, Stop.PREEMPT)
    if step == run.steps.start:  # asked while the run started: nothing was trained to save
        raise error(f"stopped on {what.value} before step {step + 1}; train.resume=auto with the same run.name runs it")
    if not saved:
        _save_checkpoint(run, step, feed.epoch)
    raise error(
        f"stopped at step {step} on {what.value}, after writing its checkpoint; train.resume=auto with the same "
        "run.name continues it"
    )


def _evaluate(run: Run, step: int) -> None:
    """Collective: test reconstruction error over every process's share; the main process saves and logs."""
    acc = run.accelerator
    run.where.at(step, "evaluation")
    start = time.perf_counter()
    sum_over_processes = lambda t: acc.reduce(t, reduction="sum")  # noqa: E731
    result = evaluate(
        run.modules.autoencoder.raw, run.objective.cost, run.eval_set, run.layout.micro, sum_over_processes, acc.gather
    )
    if not acc.is_main_process:
        return
    for key, image in result.figures.items():
        path = run.dir.figure(key, step)
        grids.save(image, path)
        run.records.figure(step, key, path)
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    run.records.metrics(step, result.metrics | {"perf/eval_s": time.perf_counter() - start})  # for the stop lead


def _save_checkpoint(run: Run, step: int, epoch: int) -> None:
    """Collective: every process writes its part, then the main process completes and publishes the checkpoint."""
    acc, root = run.accelerator, run.dir.checkpoints
    run.where.at(step, "checkpoint")
    start = time.perf_counter()
    directory, what = checkpoint.tmp_dir(root, step), f"checkpoint {checkpoint_name(step)}"
    # Every process's own part first, agreed: written after the modules, another process's file could recreate the
    # partial directory the main process had just removed on a failed write.
    _write_rank_states(run, directory, what)
    with _written(run, directory, what, RESUME):  # the modules' files: the main process writes them
        for module in run.modules:
            module.save(directory)
    if acc.is_main_process:
        if acc.scaler is not None:
            checkpoint.save_scaler(directory, acc.scaler.state_dict())
        state = {
            "step": step,
            "micro_batches": step * run.layout.accumulation,
            "epoch": epoch,
            "penalty_weight": run.objective.weight,
            "samples_seen": step * run.layout.global_batch,
            "world_size": acc.num_processes,
            "deepspeed": acc.distributed_type == DistributedType.DEEPSPEED,
            "mode": distribution_mode(acc),
            "mlflow_run_id": run.records.tracker.run_id if run.records.tracker else None,
            "data": job.training_shards(run.stream),
        }
        with _written(run, directory, what, RESUME):
            checkpoint.write_state(directory, state, to_yaml(run.cfg))
            path = checkpoint.commit(root, step, run.cfg.checkpoint.keep_last_k)
        seconds = time.perf_counter() - start
        log.info("checkpoint %s written in %.2f s", path, seconds)
        run.records.metrics(step, {"perf/checkpoint_s": seconds})
    acc.wait_for_everyone()


@contextlib.contextmanager
def _written(run: Run, partial: Path, what: str, then: str) -> Iterator[None]:
    """Where ``what`` (a checkpoint, the export) is written, into the directory ``partial`` until complete: a write
    that fails (a full disk or quota, read-only or failing storage) removes the partial directory, which frees its
    space, and stops the run with a StorageError saying what is intact and, after freeing space, ``then`` (not a
    traceback, and no partial files left to fill the disk)."""
    try:
        yield
    except checkpoint.WRITE_ERRORS as e:
        raise _not_written(run, partial, what, str(e), then, room=not in_the_way(e)) from None


def _write_rank_states(run: Run, directory: Path, what: str) -> None:
    """Collective: every process writes the state of its random generators into the checkpoint. The processes
    agree on the outcome, so that a write failing on any of them (its own disk quota or file size limit, a
    storage error seen by one node) stops all of them with the same error naming that process, rather than the
    others meeting a vanished peer or a removed directory."""
    acc = run.accelerator
    try:
        checkpoint.write_rank_state(directory, acc.process_index)
        failure = ""
    except checkpoint.WRITE_ERRORS as e:
        failure = f"process {acc.process_index}: {e}"
    failures = [f for f in gather_object([failure]) if f]
    if failures:
        raise _not_written(run, directory, what, "; ".join(failures), RESUME)


def _not_written(run: Run, partial: Path, what: str, reason: str, then: str, room: bool = True) -> StorageError:
    """The error of a ``what`` that could not be written for ``reason`` (for want of ``room``, or another, such as
    a file in a checkpoint's place); the main process removes its partial directory (only the main process does,
    so that no other process pulls it from under its writes)."""
    if run.accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    mend = (
        "Free space there (or raise the quota; a run needs room for checkpoint.keep_last_k checkpoints and one "
        "more, written before the oldest goes)"
        if room
        else "Move away what the error names (something in the place the run writes to)"
    )
    return StorageError(
        f"{what} could not be written in {partial.parent}: {reason}. Its partial files were removed; "
        f"{verdict.kept(run)}. {mend}, then {then}"
    )


def _export(run: Run) -> None:
    """Collective: the final model, consolidated (gathered under ZeRO-3), as <run_dir>/export. Every process waits
    for the main one to have written and logged it, so that no process of a run ends with status 0 before its
    export exists."""
    weights = run.modules.autoencoder.full_state_dict()
    if run.accelerator.is_main_process:
        then = (
            f"`vegan-scale export {run.dir.path} --out {run.dir.export}` writes it from there"
            if run.dir.newest_checkpoint()
            else "train again: with checkpoint.every_steps=0 the export was the only copy of the weights"
        )
        with _written(run, run.dir.export, "the export", then):
            remedy = f"move them out of it (the run's export is its own); {then}"
            path = export.write(run.dir.export, weights, dataclasses.asdict(run.cfg), run.step, remedy)
        log.info("model exported to %s", path)
        run.records.export(run.step, path)
    run.accelerator.wait_for_everyone()
