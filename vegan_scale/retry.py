"""Retrying transient failures with exponential backoff: one mechanism for shard reads, shard indexes and tracking.

``for attempt in retrying(backoff, transient, on_retry): with attempt: ...`` runs the block until it completes
without a transient error (tenacity's pattern, which also works inside generators, where the block may yield
samples and resume where it left off). A transient error is swallowed by the attempt, reported through
``on_retry`` with the coming pause, and the block runs again after the pause; an error that is not transient
propagates at once; when the tries run out the last error propagates, or what ``give_up`` makes of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    attempts: int | None = 5  # tries in all, the first included; None: until one succeeds
    backoff_s: float = 1.0  # the first pause, doubled after each failure
    max_wait_s: float = 30.0  # the longest pause

    def waits(self) -> Iterator[float]:
        """The pauses between tries (``attempts - 1`` of them, or endless)."""
        wait, given = self.backoff_s, 0
        while self.attempts is None or given < self.attempts - 1:
            yield wait
            wait, given = min(2 * wait, self.max_wait_s), given + 1


class Attempt:
    """One try: a context manager that keeps a transient error for the loop instead of raising it."""

    def __init__(self, transient: Callable[[Exception], bool]) -> None:
        self.transient, self.error = transient, None

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> bool:
        if isinstance(error, Exception) and self.transient(error):
            self.error = error
            return True
        return False


def retrying(
    backoff: Backoff,
    transient: Callable[[Exception], bool],
    on_retry: Callable[[Exception, float], None] = lambda error, wait: None,
    give_up: Callable[[Exception], Exception] | None = None,
) -> Iterator[Attempt]:
    """Attempts until one ends without a transient error (see the module's docstring)."""
    waits = backoff.waits()
    while True:
        attempt = Attempt(transient)
        yield attempt
        if attempt.error is None:
            return
        wait = next(waits, None)
        if wait is None:
            if give_up is None:
                raise attempt.error
            raise give_up(attempt.error) from attempt.error
        on_retry(attempt.error, wait)
        time.sleep(wait)


def call(
    fn: Callable[[], T],
    backoff: Backoff,
    transient: Callable[[Exception], bool],
    on_retry: Callable[[Exception, float], None] = lambda error, wait: None,
    give_up: Callable[[Exception], Exception] | None = None,
) -> T:
    """``fn()``, retried as :func:`retrying` describes."""
    for attempt in retrying(backoff, transient, on_retry, give_up):
        with attempt:
            result = fn()
    return result
