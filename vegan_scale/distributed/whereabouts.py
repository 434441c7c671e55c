"""Where each process of a run is, so that a hang says who.

Every process keeps, in memory, the step and phase it is in (a training step, an agreement check, a checkpoint, an
evaluation), and writes them to ``<run_dir>/ranks/rank<R>.json`` at every agreement check: a heartbeat. When a
collective times out, every process that can still run writes there what it was doing, the collective's
traceback and the Python stack of each of its threads (``rank<R>.stack.txt``); the main process then waits a
moment for the others' reports and names the ranks that never reported, with the last heartbeat each left. A
process that is stopped (SIGSTOP, a frozen node) or dead cannot report: its heartbeat is what is known of it.
"""

from __future__ import annotations

import faulthandler
import json
import time
import traceback
from pathlib import Path

import torch

from vegan_scale import atomic

TRANSPORTS = ("gloo", "nccl", "c10d", "processgroup")  # where the text of a collective's failure comes from
LOST_PHRASES = ("connection closed", "connection reset", "timed out", "timeout", "broken pipe", "peer", "remote")
REPORT_WAIT_S = 5.0  # how long the main process waits for the other processes' reports after its own timeout


class Whereabouts:
    """This process's step and phase, its heartbeats and, after a timeout, its report."""

    def __init__(self, directory: Path, rank: int, world_size: int, started_at: float) -> None:
        """``started_at``: when this attempt started (files older than that are an earlier attempt's)."""
        self.directory, self.rank, self.world_size, self.started_at = directory, rank, world_size, started_at
        self.step, self.phase = 0, "starting"

    def at(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase

    def heartbeat(self) -> None:
        self._write("rank{}.json", json.dumps(self._record(timed_out=False)))

    def report_timeout(self, error: BaseException) -> None:
        """What this process was doing when ``error`` (a collective's timeout) ended it: the record, and the stacks."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stack = self.directory / f"rank{self.rank}.stack.txt"
        with stack.open("w") as out:
            out.write(f"rank {self.rank}, step {self.step}, {self.phase}: {str(error).splitlines()[0]}\n\n")
            out.write("".join(traceback.format_exception(error)) + "\nEvery thread:\n")
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
        self._write("rank{}.json", json.dumps(self._record(timed_out=True)))

    def missing(self, wait_s: float = REPORT_WAIT_S) -> str:
        """Main process, after its own report: the ranks that did not report a timeout within ``wait_s``, each with
        its last heartbeat, as a sentence ('' when every rank reported)."""
        deadline = time.monotonic() + wait_s
        while True:
            records = {r: self._read(r) for r in range(self.world_size)}
            absent = [r for r, record in records.items() if not (record or {}).get("timed_out")]
            if not absent or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if not absent:
            return ""
        seen = "; ".join(_last_seen(r, records[r]) for r in absent)
        return f"rank(s) {', '.join(map(str, absent))} never arrived ({seen})"

    def _record(self, timed_out: bool) -> dict:
        return {"rank": self.rank, "step": self.step, "phase": self.phase, "time": time.time(), "timed_out": timed_out}

    def _write(self, pattern: str, text: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.directory / pattern.format(self.rank), text + "\n")

    def _read(self, rank: int) -> dict | None:
        """A rank's record of this attempt, or None."""
        try:
            record = json.loads((self.directory / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("time", 0) >= self.started_at else None


def _last_seen(rank: int, record: dict | None) -> str:
    if record is None:
        return f"rank {rank}: no heartbeat in this attempt"
    ago = time.time() - record["time"]
    return f"rank {rank} last reported step {record['step']}, {record['phase']}, {ago:.0f} s ago"


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process is gone. torch's store and NCCL raise DistError; gloo
    raises a plain RuntimeError whose text names its own source file ("[.../gloo/transport/tcp/pair.cc:553]
    Connection closed by peer", "... unbound_buffer.cc:78] Timed out waiting 5000ms for recv"), so the text must
    come from a transport as well as say a peer or a timeout: a RuntimeError of the run's own that says "timeout"
    is not a lost process."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return (
        isinstance(error, RuntimeError)
        and any(transport in text for transport in TRANSPORTS)
        and any(phrase in text for phrase in LOST_PHRASES)
    )
