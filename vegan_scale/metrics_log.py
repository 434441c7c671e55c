"""``metrics.jsonl``: every flushed metric of a run, one JSON object per line, written before any tracker sees it.

It is the run's own record: a tracking server that was away is sent what it lacks from here
(``vegan-scale sync``), and a run continued from a checkpoint keeps the lines up to its start step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TextIO

from vegan_scale import atomic, stored_json

log = logging.getLogger(__name__)


def read(path: Path) -> list[dict]:
    """The lines of a metrics file. A line that is not a metrics row is left out: cut short by a kill (the last),
    or damaged on storage that lost power (zeros or garbage, bytes that are not UTF-8), which a warning counts: a
    continuation rewrites the file without them, and sync cannot send them."""
    if not path.exists():
        return []
    lines, damaged = [], 0
    raw = path.read_bytes().splitlines()
    for i, line in enumerate(raw):
        try:
            row = stored_json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            lines.append(row)
        elif i < len(raw) - 1:
            damaged += 1
    if damaged:
        log.warning("%s: %d damaged line(s) left out, their metrics lost", path, damaged)
    return lines


def truncate(path: Path, step: int) -> None:
    """Keep only the metrics of steps up to ``step`` (a continued run writes the later ones again)."""
    kept = [m for m in read(path) if m["step"] <= step]
    atomic.write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


class MetricsLog:
    """Appends lines to a metrics file, each flushed at once (a killed run loses no flushed metric)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO = path.open("a")

    def append(self, step: int, values: dict[str, float]) -> None:
        with atomic.naming(self.path):
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()

    def close(self) -> None:
        with atomic.naming(self.path):
            self._file.close()
