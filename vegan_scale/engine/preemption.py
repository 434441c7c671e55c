"""Stop requests: signals and the flag file, turned into flags the ranks agree on at their next check.

A cluster asks a job to stop in several ways, and launchers get in between: ``accelerate launch`` and torchrun do
not forward SIGUSR1, and kill their workers about 30 s after forwarding SIGTERM. So a run listens for all of them:

* ``<run_dir>/PREEMPT``: a file a batch script's trap creates (the way through any launcher; see launch/slurm);
* SIGUSR1 or SIGTERM delivered to the process itself (srun without a launcher, or a forwarded SIGTERM);
* SIGINT (Ctrl-C): the same, but the run exits 130; a second Ctrl-C interrupts at once.

Handlers only set a flag: a handler that exited in the middle of a collective would leave the other ranks hanging.
The loop polls at its agreement checks, every rank stops at the same step, and a checkpoint is written first.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from vegan_scale.distributed.agreement import Flag

log = logging.getLogger("vegan_scale")


class StopRequests:
    """Collects stop requests for the duration of a run; use as a context manager (handlers are restored)."""

    def __init__(self, flag_file: Path | None) -> None:
        self.flag_file = flag_file
        self.requested: Flag | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: signals cannot be caught; only %s stops it", self.flag_file)
            return self
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self.requested == Flag.INTERRUPT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            self.requested = Flag.INTERRUPT
            log.warning("Ctrl-C: stopping after a checkpoint at the next check (Ctrl-C again to stop at once)")
        elif self.requested is None:
            self.requested = Flag.PREEMPT
            log.warning("%s: stopping after a checkpoint at the next check", signal.Signals(signum).name)

    def poll(self) -> Flag | None:
        """The stop this process has been asked for, if any (checks the flag file)."""
        if self.requested is None and self.flag_file is not None and self.flag_file.exists():
            self.requested = Flag.PREEMPT
            log.warning("%s found: stopping after a checkpoint", self.flag_file)
        return self.requested
