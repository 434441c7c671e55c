"""Everything a training run needs, built from the configuration in dependency order.

The Accelerator first (it knows the world size), then the batch layout, the run directory (named by the main
process and shared), what to continue from, the data, the trained modules and the objective, the evaluation set,
and finally the records (metrics file and tracker). Each part comes from the module that owns it; this one only
puts them in order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from vegan_scale import metrics_log, rundir
from vegan_scale.config.load import to_yaml
from vegan_scale.config.validate import check_batch
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.distributed.accelerator import BatchLayout, apply_layout, build_accelerator, launch_tags, node_of
from vegan_scale.distributed.whereabouts import Whereabouts, lost_peer
from vegan_scale.engine import job, resume
from vegan_scale.engine.feed import open_stream
from vegan_scale.engine.modules import Modules, build_modules, module_names
from vegan_scale.engine.objective import POT
from vegan_scale.engine.periodic_eval import EvalSet
from vegan_scale.engine.records import Records
from vegan_scale.engine.schedule import Steps
from vegan_scale.errors import LostRankError, RunRefusedError, exit_status
from vegan_scale.metrics_log import MetricsLog
from vegan_scale.rundir import RunDir
from vegan_scale.tracking.system_metrics import SystemMetrics
from vegan_scale.tracking.tracker import Tracker

log = logging.getLogger("vegan_scale")


@dataclass(kw_only=True)
class Run:
    """The parts of one training run, as the loop uses them."""

    cfg: Any
    accelerator: Accelerator
    layout: BatchLayout
    dir: RunDir
    stream: TrainStream  # this process's micro-batches
    steps: Steps
    modules: Modules
    objective: POT
    eval_set: EvalSet
    records: Records  # the main process's; empty elsewhere
    where: Whereabouts  # this process's step and phase, for the report of a hang
    step: int = 0  # the last step completed, kept current by the loop (for the exit status)
    lock: IO[str] | None = None  # the main process's lock of the run directory, closed when the run ends


def _run_dir(cfg: Any, accelerator: Accelerator) -> RunDir:
    """The run directory; the main process picks the default name (it contains a timestamp) for everyone."""
    m, parent = cfg.model, Path(cfg.run.root) / cfg.run.experiment
    name = [cfg.run.name]
    if not name[0] and accelerator.is_main_process:
        batch, lr = cfg.train.global_batch_size, cfg.optim.lr
        name = [rundir.default_run_name(parent, cfg.penalty.kind, m.network, m.latent_dim, batch, lr)]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return RunDir(parent / name[0])


def _records(cfg: Any, run_dir: RunDir, accelerator: Accelerator, start_step: int, notes: list[str] | None) -> Records:
    """Main process: the run directory made ready (a continued run keeps the metrics up to its start), and the
    tracker opened before the first step."""
    continuing = notes is not None
    if continuing:
        metrics_log.truncate(run_dir.metrics, start_step)
    nodes = node_of(accelerator)[1]
    tracker = Tracker.for_run(cfg, run_dir, launch_tags(accelerator), notes, "node0" if nodes > 1 else None)
    return Records(MetricsLog(run_dir.metrics), tracker)


def _node_sampler(cfg: Any, accelerator: Accelerator, records: Records, continuing: bool) -> SystemMetrics | None:
    """Collective in a multi-node run with ``tracking.system_metrics``: the main process shares its MLflow run, and
    the first process of every other node samples its node into it, labelled node<N> (MLflow's node id), so that
    each node's use shows, not only the first's."""
    node, nodes = node_of(accelerator)
    if nodes == 1 or not cfg.tracking.system_metrics or cfg.tracking.backend == "none":
        return None
    tracker = records.tracker
    shared = [(tracker.run_id, tracker.uri) if tracker is not None else None]
    broadcast_object_list(shared)
    if node == 0 or not accelerator.is_local_main_process or shared[0] is None or shared[0][0] is None:
        return None  # node 0 samples in its tracker; a server not reached at start leaves the others unsampled
    run_id, uri = shared[0]
    return SystemMetrics(run_id, uri, f"node{node}", resume=continuing)


def build_run(cfg: Any, started_at: float, stopping: Callable[[], bool] = lambda: False) -> Run:
    """Build every part; the run directory is written last, once nothing can fail on bad input any more. A
    failure after the run directory is known, in a run directory that exists (a run being continued), is recorded in
    its exit_status.json, so that a batch script never reads the previous attempt's status. ``started_at``: when
    this process started listening for stop requests (an older PREEMPT file was for an earlier attempt);
    ``stopping``: whether one came (a read at start that stalls then ends at once, as a stop)."""
    t = cfg.train
    accelerator = build_accelerator(
        t.mixed_precision,
        module_names(cfg),
        timeout_s=t.collective_timeout_s,
        grad_compression=t.grad_compression,
        bucket_mb=t.ddp_bucket_mb,
        low_precision_weights=t.low_precision_weights,
    )
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        # That also fills every new tensor with NaN, to catch reads of memory never written. DeepSpeed allocates its
        # gradient buckets (50M elements each) afresh at every step, and filling them took most of a small ZeRO-2
        # step on a CPU (0.4 s). The computations are deterministic without the fill.
        torch.utils.deterministic.fill_uninitialized_memory = False
    layout = BatchLayout.derive(cfg.train.global_batch_size, accelerator.num_processes, cfg.train.micro_batch_size)
    check_batch(cfg, layout.micro, layout.world_size)
    apply_layout(accelerator, layout, cfg.train.mixed_precision)
    run_dir = _run_dir(cfg, accelerator)
    try:
        lock = job.own_run_dir(run_dir, accelerator, held=None, create=False)  # a run to continue, before it is read
        return _assemble(cfg, accelerator, layout, run_dir, started_at, lock, stopping)
    except BaseException as error:
        lost = _lost_at_start(error) if accelerator.num_processes > 1 else None
        # the status of this attempt, unless it refused to take the run over
        if accelerator.is_main_process and run_dir.path.is_dir() and not isinstance(error, RunRefusedError):
            run_dir.write_exit_status(*exit_status(lost or error), step=0)
        if lost is not None:
            raise lost from error
        raise


def _lost_at_start(error: BaseException) -> LostRankError | None:
    """A collective of the start-up that failed because another process is gone (it failed on its data or its
    configuration, was killed, or froze past the collective timeout): said as such, exit 69, where the transport's
    traceback said nothing of the cause. That process's own output says what ended it."""
    if not lost_peer(error):
        return None
    return LostRankError(
        f"another process stopped answering while the run was being set up, before its first step "
        f"({str(error).strip().splitlines()[0][:200]}): a process that ended says why in its own output (one that "
        "failed on its data or its configuration ends with that message); one that froze (stopped, or on a hung "
        "node) writes nothing, and its node's state is for the scheduler to tell"
    )


def _assemble(
    cfg: Any,
    accelerator: Accelerator,
    layout: BatchLayout,
    run_dir: RunDir,
    started_at: float,
    lock: IO[str] | None,
    stopping: Callable[[], bool],
) -> Run:
    Tracker.check(cfg)
    stream = open_stream(cfg, accelerator, layout)
    job.same_experiment(cfg, stream, accelerator)
    candidates = resume.locate(cfg.train.resume, run_dir, accelerator)
    if cfg.train.resume == "never" and run_dir.holds_run():
        raise RunRefusedError(
            f"run directory {run_dir.path} already holds a run; choose another run.name, or continue it "
            "with train.resume=auto"
        )
    modules, penalty = build_modules(cfg, accelerator, not candidates and not cfg.train.init_from, stopping)
    config = dataclasses.asdict(cfg)
    if cfg.train.init_from and not candidates:
        resume.start_from_export(Path(cfg.train.init_from), modules.autoencoder, config)
    objective = POT.of(cfg, penalty)
    eval_set = EvalSet.load(cfg, accelerator, objective.prior, stopping)
    torch.manual_seed(cfg.run.seed + 1 + accelerator.process_index)  # what draws outside a step's StepNoise
    named = cfg.train.resume not in ("auto", "never")
    data = (job.training_shards(stream), job.training_data(stream))
    resumed = resume.restore(candidates, named, list(modules), accelerator, config, data)
    start_step = resumed.step if resumed else 0
    if resumed is not None:  # the adaptive lambda where the checkpoint left it
        objective.weight = resumed.state.get("penalty_weight", objective.weight)
    steps = Steps.count(
        start_step, cfg.train.epochs, stream.batches_per_epoch, layout.accumulation, cfg.train.max_steps
    )
    records = Records()
    continuing = resumed is not None or run_dir.holds_run()  # over an attempt that saved no checkpoint yet
    lock = job.own_run_dir(run_dir, accelerator, held=lock, create=True)  # a new run, before it is first written
    if accelerator.is_main_process:
        run_dir.prepare(to_yaml(cfg), started_at)
        records = _records(
            cfg, run_dir, accelerator, start_step, (resumed.notes if resumed else []) if continuing else None
        )
        if continuing and resumed is None:
            log.warning(
                "%s holds a run but no checkpoint to continue from (checkpoint.every_steps=0, or it stopped before "
                "its first): training starts again at step 1, and its metrics and export are replaced",
                run_dir.path,
            )
    records.node = _node_sampler(cfg, accelerator, records, continuing)
    job.shared_run_dir(run_dir, accelerator, cfg.train.collective_timeout_s / 10)
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        layout=layout,
        dir=run_dir,
        stream=stream,
        steps=steps,
        modules=modules,
        objective=objective,
        eval_set=eval_set,
        records=records,
        where=Whereabouts(run_dir.ranks, accelerator.process_index, accelerator.num_processes, started_at),
        lock=lock,
    )
