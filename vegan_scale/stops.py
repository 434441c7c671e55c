"""Stop requests: signals and the flag file, turned into a request the ranks agree on at their next check.

A cluster asks a job to stop in several ways, and launchers get in between. SLURM's preemption and ``scancel``, and
``accelerate launch``/torchrun when they are signalled, send SIGTERM to every process of the job, loader workers
included; ``accelerate launch`` and torchrun do not forward SIGUSR1, and kill their workers 30 s after forwarding
SIGTERM unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise (the scripts in launch/ set it). So a run listens for
all of them, from the moment it starts (the CLI installs the handlers before anything heavy is imported):

* ``<run_dir>/PREEMPT``: a file a batch script's trap creates (the way through any launcher; see launch/slurm);
* SIGUSR1 or SIGTERM delivered to the process (srun without a launcher, a forwarded SIGTERM, a process group);
* SIGHUP, the terminal closing (an SSH session that drops): the same, as torchrun treats it, and the console that
  is a terminal is sent to /dev/null from then on, since writing to a closed terminal fails (the main process's
  train.log keeps the log);
* SIGQUIT, which torchrun counts among the signals that shut a job down and forwards: the same (its default
  ended every rank at once, with no checkpoint and no exit status);
* SIGINT (Ctrl-C): the same, but the run exits 130; a second Ctrl-C interrupts at once.

Handlers only record the request: a handler that exited in the middle of a collective would leave the other ranks
hanging. The training loop polls at its agreement checks (and once before its first step), every rank stops at the
same step, and a checkpoint is written first. Nor do handlers log: one runs in the main thread wherever that was
interrupted, which can be inside a write to train.log or the console, and a second write into the same buffered
file there fails ("reentrant call": the line was lost); a thread logs what they say, waiting its turn for the file.
Loader workers leave stopping to their training process (:mod:`vegan_scale.data.pipeline`). Before anything has
started, while the process waits in native code for the other processes of its job, a stop ends it at once
(:func:`ending_at_once`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from vegan_scale import logs
from vegan_scale.errors import ExitCode

log = logging.getLogger("vegan_scale")

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT)
STOP_PATIENCE_S = 10.0  # a wait for data this long when a stop is asked for: a stall the stop ends


def ends_wait(waited_s: float, stopping: Callable[[], bool]) -> bool:
    """Whether a wait for data that has lasted ``waited_s`` ends now because a stop was asked for (``stopping``):
    SLURM's KillWait is shorter than data.stall_timeout_s, and a merely slow read delivers within STOP_PATIENCE_S."""
    return waited_s >= STOP_PATIENCE_S and stopping()


class Stop(enum.Enum):
    PREEMPT = "a stop request"  # checkpoint, exit 75: requeue to continue
    INTERRUPT = "Ctrl-C"  # checkpoint, exit 130


class StopRequests:
    """Collects stop requests while active; use as a context manager (the previous handlers are restored)."""

    def __init__(self, flag_file: Path | None = None) -> None:
        self.flag_file = flag_file
        self.requested: Stop | None = None
        self.since = time.time()  # a flag file older than this was for an earlier attempt
        self._previous: dict[int, object] = {}
        self._terminals: list[int] = []  # the standard streams that are a terminal (after a hang-up, none says so)
        self._said: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # put() is safe in a signal handler
        self._sayer: threading.Thread | None = None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            log.warning("running outside the main thread: signals cannot be caught; only the PREEMPT file stops it")
            return self
        self._terminals = [fd for fd in (1, 2) if os.isatty(fd)]
        self._sayer = threading.Thread(target=self._say, name="stop-requests", daemon=True)
        self._sayer.start()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._sayer is not None:  # what the handlers said is logged before this returns
            self._said.put(None)
            self._sayer.join()
            self._sayer = None

    def _say(self) -> None:
        while (message := self._said.get()) is not None:
            log.warning(message)

    def watch(self, flag_file: Path) -> None:
        """Also stop when ``flag_file`` appears (known once the run directory is)."""
        self.flag_file = flag_file

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            _leave_closed_terminal(self._terminals)
        if signum == signal.SIGINT:
            if self.requested == Stop.INTERRUPT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            self.requested = Stop.INTERRUPT
            self._said.put("Ctrl-C: stopping after a checkpoint at the next check (Ctrl-C again to stop at once)")
        elif self.requested is None:
            self.requested = Stop.PREEMPT
            self._said.put(f"{signal.Signals(signum).name}: stopping after a checkpoint at the next check")

    def asked(self) -> bool:
        """Whether a stop has been asked for (:meth:`poll`), for a wait that a stop ends."""
        return self.poll() is not None

    def poll(self) -> Stop | None:
        """The stop this process has been asked for, if any (checks the flag file)."""
        if self.requested is None and self.flag_file is not None and self.flag_file.exists():
            self.requested = Stop.PREEMPT
            log.warning("%s found: stopping after a checkpoint", self.flag_file)
        return self.requested


def _leave_closed_terminal(terminals: list[int]) -> None:
    """After a hang-up, every write to the terminal fails (EIO), and a progress bar or the last lines of the run would
    end it with an error instead of its checkpoint: the standard streams that were a terminal go to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in terminals:
        os.dup2(devnull, fd)
    os.close(devnull)


@contextlib.contextmanager
def ending_at_once(waiting_for: str) -> Iterator[None]:
    """While the main thread waits in native code that returns only after a timeout (torch's rendezvous waiting for
    the other processes of a job, up to train.collective_timeout_s), a stop signal ends the process at once, with the
    exit code of the stop (75, or 130 for Ctrl-C). Python runs signal handlers in the main thread between bytecodes,
    so :class:`StopRequests` would hear of the signal only when the wait ends, and a second Ctrl-C would not
    interrupt it either; here a thread wakes on the signal's byte (``signal.set_wakeup_fd``). Only for waits before
    anything has started: nothing is lost by ending."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_end_on_stop_signal, args=(read, waiting_for), name="stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write)  # the watcher reads the end of the pipe and returns
        watcher.join()
        os.close(read)


def _end_on_stop_signal(read: int, waiting_for: str) -> None:
    while signals := os.read(read, 64):
        for signum in signals:
            if signum in SIGNALS:
                code = ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.PREEMPTED
                name = signal.Signals(signum).name
                with contextlib.suppress(OSError, ValueError):  # a terminal that closed (SIGHUP), a closed stream
                    logs.say(f"error: stopped on {name} while waiting for {waiting_for}; nothing had started")
                os._exit(code)
