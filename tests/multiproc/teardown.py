"""One rank of a gloo job whose process ends while a worker thread of its process group still releases the tensors of
a collective, as ZeRO-3 leaves it: ``python tests/multiproc/teardown.py leave|teardown`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set.

A tensor is gathered asynchronously and its last Python reference dropped while the collective runs, so the gloo
worker thread that ran it releases it, which takes the interpreter's lock. That thread is held there until the
interpreter's teardown has begun, as a thread descheduled on a busy node may be. ``leave`` ends the process through
:func:`vegan_scale.process_exit.leave`; ``teardown`` lets the interpreter end it.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vegan_scale.process_exit import leave

KEPT: list = []  # the process groups, kept to the teardown as DeepSpeed keeps its groups (and so their threads)
HELD: list[threading.Event] = []  # per gather: set when a worker thread held in its release may go on


@dataclass
class Release:
    """Where a gathered tensor was released, and when a worker thread that released it may go on."""

    done: threading.Event = field(default_factory=threading.Event)
    in_worker: bool = False
    go_on: threading.Event = field(default_factory=threading.Event)

    def __call__(self) -> None:
        self.in_worker = threading.current_thread() is not threading.main_thread()
        self.done.set()
        if self.in_worker:
            self.go_on.wait(60)  # then this thread needs the interpreter's lock again


class _Teardown:
    """Its ``__del__`` runs in the teardown's garbage collection (see :func:`_at_teardown`): the held worker threads
    go on."""

    def __del__(self) -> None:
        for go_on in HELD:
            go_on.set()
        time.sleep(1)  # the lock is free for them


def main(mode: str) -> None:
    dist.init_process_group("gloo")
    # The gathers run in a group of their own: a worker thread held while it releases a tensor holds its group's
    # work queue (the release happens under the queue's lock); the ranks agree in the default group.
    gathering = dist.new_group()
    KEPT.append(gathering)
    for _ in range(200):  # until every rank releases its gathered tensor in a worker thread (timing decides)
        release = Release()
        HELD.append(release.go_on)
        gathered, mine = torch.empty(2 * 500_000), torch.ones(500_000)
        work = dist.all_gather_into_tensor(gathered, mine, group=gathering, async_op=True)
        weakref.finalize(gathered, release)
        del gathered, mine
        work.wait()
        del work  # the worker thread may now hold the last reference
        release.done.wait(10)
        everyone = torch.tensor([float(release.in_worker)])
        dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
        if everyone.item() == 1.0:
            break
        release.go_on.set()
    else:
        raise SystemExit("the ranks never released their gathered tensors in worker threads at once")
    dist.barrier()
    dist.destroy_process_group()
    print("finished", flush=True)
    if mode == "leave":
        leave(0)


def _at_teardown() -> None:
    """A _Teardown in a reference cycle, left to the collection the teardown runs (automatic collection off)."""
    gc.disable()
    cycle = _Teardown()
    cycle.itself = cycle  # type: ignore[attr-defined]


if __name__ == "__main__":
    _at_teardown()
    main(sys.argv[1])
