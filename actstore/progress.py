"""Progress of long jobs: a live tqdm bar on a terminal, and in a log file (a batch job's output, where a bar's
carriage returns would pile up on one line, and tqdm's default shows nothing) a plain line every so often."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, TypeVar

from dask.callbacks import Callback
from tqdm import tqdm

LOG_INTERVAL_S = 60.0
T = TypeVar("T")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class LineProgress:
    """The part of tqdm's interface that our jobs use (``update``, ``set_postfix``, ``close``), written as a line at
    most every ``interval`` seconds and once at the end."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = LOG_INTERVAL_S,
                 write: Callable[[str], None] = _to_stderr, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.interval, self.write = total, desc, unit, interval, write
        self.n = self.initial = initial  # done before this run (a resumed job): not counted in its rate
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.closed = False
        self.shown: int | None = None  # the count of the last line written

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; write a line if the last one is ``interval`` old."""
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (rates, say), as tqdm's ``set_postfix``."""
        self.postfix = values

    def close(self) -> None:
        """Write the last line."""
        if not self.closed:
            self.closed = True
            if self.shown != self.n:  # not when the last line already said it
                self._line()

    def _line(self) -> None:
        self.last, self.shown = time.monotonic(), self.n
        elapsed = self.last - self.start
        share = self.n / self.total if self.total else 1.0
        parts = [f"[{self.desc}] {self.n}/{self.total} {self.unit}s ({100 * share:.0f}%)"]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        parts.append(f"{timedelta(seconds=round(elapsed))} elapsed")
        if self.initial < self.n < self.total:
            left = elapsed * (self.total - self.n) / (self.n - self.initial)
            parts.append(f"~{timedelta(seconds=round(left))} left")
        self.write(", ".join(parts))


def log_interval() -> float:
    """Seconds between progress lines in a log: ``ACTSTORE_PROGRESS_INTERVAL``, default 60."""
    return float(os.environ.get("ACTSTORE_PROGRESS_INTERVAL", LOG_INTERVAL_S))


def progress(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> Any:
    """A progress display of ``total`` units (``initial`` of them done already): a tqdm bar on a terminal, a
    :class:`LineProgress` otherwise (:func:`log_interval` seconds apart), nothing when not ``enabled``."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc, unit, log_interval(), initial=initial)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, initial=initial)


def counted(items: Iterable[T], bar: Any) -> Iterator[T]:
    """``items``, each counted into ``bar`` once the loop's body for it is done (as iterating a tqdm bar counts)."""
    for item in items:
        yield item
        bar.update(1)
    bar.close()


class TaskProgress(Callback):
    """A local scheduler's finished tasks counted into :func:`progress`: a bar on a terminal, a line
    a minute in a log (dask's own bar redraws itself ten times a second, into a log file too)."""

    def __init__(self, desc: str) -> None:
        super().__init__()
        self.desc, self.bar = desc, None

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        self.bar = progress(sum(len(state[k]) for k in ("ready", "waiting", "running", "finished")), self.desc, "task")

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self.bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        if self.bar is not None:
            self.bar.close()


def wait_with_progress(futures: list[Any], desc: str) -> None:
    """Wait for a ``distributed.Client``'s ``futures`` (and the tasks they depend on): distributed's text bar on a
    terminal, :class:`LineProgress` lines in a log."""
    from distributed import progress as text_bar
    from distributed.diagnostics.progressbar import TextProgressBar

    if sys.stdout.isatty():
        text_bar(futures)
        return

    class ProgressLines(TextProgressBar):
        """distributed's bar, which follows the scheduler's tasks, drawn as lines: its own redraws itself every
        100 ms into the log (and a longer interval delays noticing the end by as much)."""

        def __init__(self, keys: list[Any]) -> None:
            self.lines = LineProgress(0, desc, "task", log_interval())
            super().__init__(keys)

        def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:  # noqa: A002 - distributed's name
            self.lines.total = all
            self.lines.update(all - remaining - self.lines.n)

        def _draw_stop(self, **kwargs: Any) -> None:
            self.lines.close()

    ProgressLines(futures)
