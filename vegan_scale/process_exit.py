"""How the program's process ends: as the interpreter's exit would, except for its teardown of the modules."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def leave(code: int) -> NoReturn:
    """End this process with ``code`` as the interpreter's exit would, except for its teardown of the modules.

    What the exit does first is done: the threads that are not daemons are joined (with threading's exit hooks),
    the exit handlers run (loader workers ended, logs flushed), the standard streams are flushed. Why not the rest:
    a gloo worker thread releases a collective's tensors after the collective has completed, and releasing a tensor
    that Python knew takes the interpreter's lock. A thread that takes it once the teardown has begun is ended in
    the middle of a C++ destructor, which aborts the process (SIGABRT, "terminate called without an active
    exception"): a run that finished fails under its launcher. DeepSpeed keeps its process groups, and so their
    threads, alive into the teardown; seen under ZeRO-3 in CI, shown by tests/multiproc/teardown.py.
    """
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own first step at exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a stream already closed
            stream.flush()
    os._exit(code)
