"""Progress of work that takes seconds to minutes, shown the way its reader expects.

On a terminal, a tqdm bar with count, rate and time left, drawn on stderr and gone when the work is
done (the caller logs the result). Anywhere else (a service, CI, a log file, the children of
``fedbe simulate``) plain log lines at INFO: one at each tenth of the work, but not more often than
``min_gap_seconds``, at least one every ``every_seconds``, and a last one with the time taken (work
done within ``min_gap_seconds`` logs nothing).

The environment variable ``FEDBE_PROGRESS`` overrides the choice: ``log`` gives lines even on a
terminal (the coordinator daemon sets it), ``off`` shows nothing (the bench's worker processes, which
share one terminal, set it).
Work that is one opaque call (``from_pretrained``) can not have a bar: :func:`stage` logs a start
line and a done line with the time taken instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any, TextIO, TypeVar

log = logging.getLogger(__name__)

ENV = "FEDBE_PROGRESS"
MODES = ("auto", "bar", "log", "off")
# Log lines: none closer together than this (work done sooner logs nothing, so that the many short
# evaluations of a bench stay quiet), and at least one this often.
MIN_GAP_SECONDS = 5.0
EVERY_SECONDS = 30.0

T = TypeVar("T")


def choose_mode(mode: str | None, stream: TextIO) -> str:
    """``bar``, ``log`` or ``off``: ``mode`` if given, else ``$FEDBE_PROGRESS``, else by the stream."""
    chosen = (mode or os.environ.get(ENV) or "auto").strip().lower()
    if chosen not in MODES:
        log.warning("%s=%r is not one of %s; showing progress as for auto", ENV, chosen, ", ".join(MODES))
        chosen = "auto"
    if chosen == "auto":
        isatty = getattr(stream, "isatty", None)
        return "bar" if callable(isatty) and isatty() else "log"
    return chosen


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.1f} s"
    return f"{value:.0f} s" if value < 60 else f"{int(value) // 60} min {int(value) % 60:02d} s"


class Progress:
    """A count towards ``total`` (None when unknown); use as a context manager and call :meth:`update`."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        mode: str | None = None,
        stream: TextIO | None = None,
        min_gap_seconds: float | None = None,
        every_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.mode = choose_mode(mode, self.stream)
        self.min_gap_seconds = MIN_GAP_SECONDS if min_gap_seconds is None else min_gap_seconds
        self.every_seconds = EVERY_SECONDS if every_seconds is None else every_seconds
        self.clock = clock
        self.done = 0
        self._bar: Any = None
        self._redirect: AbstractContextManager[None] | None = None
        self._started = self._last_line = 0.0
        self._tenths = 0
        self._lines = 0

    def __enter__(self) -> Progress:
        self._started = self._last_line = self.clock()
        if self.mode == "bar":
            from tqdm import tqdm  # noqa: PLC0415 - only where a bar is drawn
            from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415

            # log lines printed while the bar is up go above it instead of through it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.stream, leave=False,
                             dynamic_ncols=True)  # fmt: skip
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.mode == "bar":
            self._bar.update(n)
        elif self.mode == "log":
            now = self.clock()
            tenths = 10 * self.done // self.total if self.total else 0
            since = now - self._last_line
            if (tenths > self._tenths and since >= self.min_gap_seconds) or since >= self.every_seconds:
                self._tenths, self._last_line = tenths, now
                self._lines += 1
                log.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        elapsed = now - self._started
        rate = self.done / elapsed if elapsed > 0 else None
        if self.total is None:
            text = f"{self.desc}: {self.done} {self.unit}"
        else:
            text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done // max(self.total, 1)}%)"
        if rate:
            text += f", {rate:.3g} {self.unit}/s"
            if self.total is not None and self.done < self.total:
                text += f", about {_seconds((self.total - self.done) / rate)} left"
        return text

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.mode == "bar":
            self._bar.close()
            assert self._redirect is not None
            self._redirect.__exit__(kind, exc, tb)
        elif self.mode == "log" and kind is None:
            elapsed = self.clock() - self._started
            if not self._lines and elapsed < self.min_gap_seconds:
                return
            rate = f" ({self.done / elapsed:.3g} {self.unit}/s)" if elapsed > 0 else ""
            log.info("%s: %d %s in %s%s", self.desc, self.done, self.unit, _seconds(elapsed), rate)


def progress(
    items: Iterable[T],
    desc: str,
    unit: str = "it",
    *,
    total: int | None = None,
    mode: str | None = None,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[T]:
    """``items`` unchanged, with progress shown as each is done (``total`` defaults to ``len(items)``)."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with Progress(total, desc, unit, mode=mode, stream=stream, clock=clock) as bar:
        for item in items:
            yield item
            bar.update()


@contextmanager
def stage(
    desc: str, *, mode: str | None = None, clock: Callable[[], float] = time.monotonic
) -> Iterator[None]:
    """A start line and a done line with the time taken, for one call that can not show a bar."""
    if choose_mode(mode, sys.stderr) == "off":
        yield
        return
    log.info("%s ...", desc)
    started = clock()
    yield
    log.info("%s: done in %s", desc, _seconds(clock() - started))
