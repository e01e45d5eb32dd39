"""One progress interface for every stage, three ways to show it.

A stage reports through a :class:`Progress`:

* ``progress.log(message)`` -- one line for the user;
* ``with progress.task(name, total) as t: t.advance(n, note=...)`` -- counted work (shards,
  parts, batches) with a status note (rate, failures);
* ``with progress.step(description):`` -- one piece of uncounted work, reported with its duration.

:func:`make_progress` picks the display: a live rich bar on a terminal; plain lines every
``interval`` seconds (done/total, rate, note, ETA) when stdout is a file or a pipe, which is
what ``ray job logs`` shows (rich's live display would print only at exit there); nothing
with ``quiet``.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, note: str | None = None) -> None: ...

    def update(self, completed: int | None = None, total: int | None = None, note: str | None = None) -> None: ...


class Progress(Protocol):
    def log(self, message: str) -> None: ...

    def task(self, name: str, total: int | None, unit: str = ""): ...

    def step(self, description: str): ...


def _eta(done: int, total: int | None, elapsed: float) -> str:
    if not total or not done or done >= total:
        return ""
    left = elapsed / done * (total - done)
    h, rem = divmod(int(left), 3600)
    m, s = divmod(rem, 60)
    return f", ETA {h}h{m:02d}m" if h else f", ETA {m}m{s:02d}s"


class _Counter:
    def __init__(self, name: str, total: int | None, unit: str):
        self.name, self.total, self.unit = name, total, unit
        self.completed, self.note = 0, ""
        self.started = time.time()

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.completed + n, note=note)

    def update(self, completed: int | None = None, total: int | None = None, note: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        self.changed()

    def changed(self) -> None:
        pass

    def line(self) -> str:
        elapsed = time.time() - self.started
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        note = f", {self.note}" if self.note else ""
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.name}: {self.completed}{of}{unit}{pct}{note}, {elapsed:.0f}s{_eta(self.completed, self.total, elapsed)}"


class NullProgress:
    """Shows nothing (``--quiet``)."""

    def log(self, message: str) -> None:
        pass

    @contextmanager
    def task(self, name: str, total: int | None, unit: str = "") -> Iterator[_Counter]:
        yield _Counter(name, total, unit)

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        yield


class PlainProgress:
    """Plain lines on a stream, a task's status at most every ``interval`` seconds, and at its end."""

    def __init__(self, stream=None, interval: float = 30.0):
        self.stream = stream or sys.stdout
        self.interval = interval

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    @contextmanager
    def task(self, name: str, total: int | None, unit: str = "") -> Iterator[_Counter]:
        counter = _Counter(name, total, unit)
        last = [time.time()]

        def changed() -> None:
            if time.time() - last[0] >= self.interval:
                last[0] = time.time()
                self.log(counter.line())

        counter.changed = changed
        try:
            yield counter
        finally:
            self.log(counter.line() + " (done)" if counter.total is None or counter.completed >= counter.total
                     else counter.line() + " (stopped)")

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        started = time.time()
        self.log(f"{description} ...")
        yield
        self.log(f"done: {description} ({time.time() - started:.1f}s)")


class RichProgress:
    """A live rich display on a terminal."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    @contextmanager
    def task(self, name: str, total: int | None, unit: str = "") -> Iterator[_Counter]:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        counter = _Counter(name, total, unit)
        with Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                 console=self.console) as bar:
            handle = bar.add_task(name, total=total, note="")
            counter.changed = lambda: bar.update(handle, completed=counter.completed, total=counter.total,
                                                 note=counter.note)
            yield counter

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        started = time.time()
        with self.console.status(description + " ..."):
            yield
        self.console.print(f"[green]done[/green] {description} ({time.time() - started:.1f}s)")


def make_progress(quiet: bool = False, interval: float = 30.0) -> Progress:
    """Rich on a terminal, plain lines otherwise, nothing when quiet."""
    if quiet:
        return NullProgress()
    if sys.stderr.isatty() and sys.stdout.isatty():
        return RichProgress()
    return PlainProgress(interval=interval)
