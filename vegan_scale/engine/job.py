"""What the processes of one job must share, checked at start, before the first step.

A job's processes are started apart (a launcher per node, srun's tasks), each reads its own command line, files and
installation, and DDP checks none of it: processes that differ train on without a word. So each process shows the
others what it runs (its resolved configuration, its training shards as it reads them, the versions of vegan_scale
and torch) and that it sees the run directory the main process writes; a difference stops every process with a
message naming it and who holds what. The main process also locks the run directory, which one training of the
run at a time may write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import socket
import time
import urllib.parse
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from vegan_scale import atomic, provenance
from vegan_scale.config.load import flat_keys
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.errors import ConfigError, RunDirInUseError, RunRefusedError
from vegan_scale.rundir import RunDir


def same_experiment(cfg: Any, stream: TrainStream, accelerator: Accelerator) -> None:
    """Collective: every process of the job must hold the same :func:`_facts` (its resolved configuration, its view
    of the data, its installation). Processes that differ would train apart without a word: DDP averages gradients
    but not learning rates, and processes that see different shard lists draw overlapping or missing samples. A
    difference is a ConfigError on every process, naming the keys that differ and who holds what. One small
    collective (a digest each); the facts themselves travel only when the digests differ."""
    if accelerator.num_processes == 1:
        return
    facts = _facts(cfg, stream)
    if len(set(gather_object([hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()]))) == 1:
        return
    everyone = gather_object([(socket.gethostname(), facts)])
    raise ConfigError(
        f"the processes of the job do not run the same experiment: {_differences(everyone)}. Every process must read "
        "the same experiment file with the same overrides, the same shards and the same installation: one command "
        "line for every node, and the files on a file system every node shares"
    )


def _facts(cfg: Any, stream: TrainStream) -> dict[str, str]:
    """What every process of the job must hold alike: the resolved configuration, the training shards as this
    process reads them (their list and sample counts), and the versions of vegan_scale and torch."""
    return {key: repr(value) for key, value in flat_keys(dataclasses.asdict(cfg)).items()} | {
        "training data": training_data(stream),
        "vegan_scale version": provenance.version(),
        "torch version": torch.__version__,
    }


def training_data(stream: TrainStream) -> str:
    """The training shards as this process reads them, in a line: their number, their samples and a digest of
    their list and counts (what the data order follows)."""
    return _described(stream, "digest", stream.index.urls)


def training_shards(stream: TrainStream) -> str:
    """The training shards wherever they lie, in a line: as :func:`training_data`, with a digest of their file
    names (not their paths or URLs) and counts, so that the same shards copied to other storage (another
    cluster's, a laptop's) are the same, and shards written again are not."""
    paths = [urllib.parse.urlsplit(url).path if "://" in url else url for url in stream.index.urls]
    names = [path.rpartition("/")[2] for path in paths]
    return _described(stream, "names digest", names)


def _described(stream: TrainStream, digest_of: str, urls: list[str]) -> str:
    index = stream.index
    counts = index.counts if index.has_counts else []
    digest = hashlib.sha256(json.dumps([urls, counts]).encode()).hexdigest()[:12]
    samples = f"{sum(counts)} samples" if counts else "sample counts unknown"
    return f"{len(index.urls)} shard(s), {samples}, {digest_of} {digest}"


def shared_run_dir(run_dir: RunDir, accelerator: Accelerator, wait_s: float) -> None:
    """Collective: every process must see the run directory the main process writes, since a checkpoint holds
    every process's part and the report of a hang reads every process's heartbeat. A run.root on each node's own
    disk (/tmp, a local scratch) would have each node write a run directory of its own, and every checkpoint miss
    the other nodes' parts, found only when a continuation refuses them all. The main process writes a token; the
    others read it back, waiting up to ``wait_s`` for a shared file system to show it."""
    if accelerator.num_processes == 1:
        return
    token = [f"{socket.gethostname()} {secrets.token_hex(8)}"]
    if accelerator.is_main_process:
        run_dir.ranks.mkdir(exist_ok=True)
        atomic.write_text(run_dir.shared, token[0])
    broadcast_object_list(token)
    deadline = time.monotonic() + wait_s
    while not (seen := _holds(run_dir.shared, token[0])) and time.monotonic() < deadline:
        time.sleep(0.5)
    me = f"process {accelerator.process_index} ({socket.gethostname()})"
    blind = gather_object([] if seen else [me])
    if blind:
        raise ConfigError(
            f"run.root: {', '.join(blind)} cannot see the run directory {run_dir.path} that process 0 "
            f"({token[0].split()[0]}) writes (its {run_dir.shared.name} token did not show within {wait_s:g} s). "
            "Every node must see the same run directory, on a file system they all share (not /tmp or a node's "
            "own disk): a checkpoint holds every process's part"
        )


def own_run_dir(run_dir: RunDir, accelerator: Accelerator, held: IO[str] | None, create: bool) -> IO[str] | None:
    """Collective: the main process locks the run directory for the run (its lock file, to close when the run ends,
    is returned there). A second training of the same run (a job submitted again while the first runs, one
    run.name given twice) would read the checkpoints the first is pruning and write the same metrics, checkpoints
    and exit status; it stops instead, every process with the same error, naming the process that holds the run,
    and touches nothing. Called first before anything reads the directory, where only one that exists (a run to
    continue) is locked (``create=False``: a new run's directory is created last, once nothing can fail on bad
    input), then before the directory is first written, which keeps the lock ``held`` from the first call. A
    directory that holds no run but other files (:meth:`RunDir.strangers`) is refused the same way."""
    lock, refusal = held, [None]
    if accelerator.is_main_process and held is None:
        refusal = [_someone_elses(run_dir)]
        if refusal[0] is None and (create or run_dir.path.is_dir()):
            lock, holder = run_dir.take_lock()
            refusal = [holder and _in_use(run_dir, holder)]
            if refusal[0] is None and create and run_dir.holds_run():  # new at the first call: another made it since
                refusal = [_made_meanwhile(run_dir)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise refusal[0]
    return lock


def _someone_elses(run_dir: RunDir) -> RunRefusedError | None:
    strangers = run_dir.strangers()
    if not strangers:
        return None
    return RunRefusedError(
        f"run directory {run_dir.path} holds no run but other files ({', '.join(strangers[:5])}): a training "
        "would write its config.yaml and train.log among them; choose another run.root or run.name"
    )


def _made_meanwhile(run_dir: RunDir) -> RunDirInUseError:
    return RunDirInUseError(
        f"run directory {run_dir.path} was new when this training started, and another training of this run has "
        "written it since (two started at once): this one chose where to start without seeing that run. Start it "
        "again to continue that run (train.resume=auto), or choose another run.name"
    )


def _in_use(run_dir: RunDir, holder: str) -> RunDirInUseError:
    return RunDirInUseError(
        f"run directory {run_dir.path} is in use by another process of this run ({holder}): wait for it to end or "
        "stop it, or choose another run.name. If that process is gone (its node failed, and the shared file system "
        f"still holds its lock, as NFSv3 can until the node returns), remove {run_dir.lock}"
    )


def _holds(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:  # not there (yet)
        return False


def _differences(everyone: list, keys_shown: int = 3, processes_shown: int = 4) -> str:
    """The first keys whose values differ, each value with the processes (and hosts) that hold it."""
    keys = sorted({key for _, facts in everyone for key in facts})
    differing = [key for key in keys if len({facts.get(key) for _, facts in everyone}) > 1]
    described = []
    for key in differing[:keys_shown]:
        holders: dict[str | None, list[str]] = {}
        for rank, (host, facts) in enumerate(everyone):
            holders.setdefault(facts.get(key), []).append(f"{rank} ({host})")
        values = [
            f"{value} on process {', '.join(who[:processes_shown])}"
            + (f" and {len(who) - processes_shown} more" if len(who) > processes_shown else "")
            for value, who in holders.items()
        ]
        described.append(f"{key} is {' but '.join(values)}")
    more = f" (and {len(differing) - keys_shown} more key(s))" if len(differing) > keys_shown else ""
    return "; ".join(described) + more
