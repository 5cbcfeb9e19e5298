"""Progress of long work as plain lines: what starts, then at most every `every_s` seconds how
far it got with the time so far and an ETA, then how long it took. Plain lines rather than a bar
where the output is a log (DVC's, CI's): a bar there is one line of carriage returns, or nothing
(tqdm turns itself off). `duration` is the one formatter of a time span the console uses."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

EVERY_S = 30.0  # at most one progress line this often (the diffusion evaluation's are 5 s apart)


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Lines for one piece of work: `<prefix> <what> ...` at the start (unless `quiet_start`), then
    at most every `every_s` seconds `<done>/<total> <unit>` with the time so far and an ETA, then
    how long it took (`finish`)."""

    def __init__(self, prefix: str, what: str, total: int, unit: str, every_s: float | None = None,
                 quiet_start: bool = False) -> None:
        self.prefix, self.what, self.total, self.unit = prefix, what, total, unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.done = 0
        self.start = self.last = time.perf_counter()
        if not quiet_start:
            print(f"{prefix} {what} ...", flush=True)

    def step(self, n: int = 1) -> None:
        """`n` more of `total` done; prints a line when the last one is `every_s` old."""
        self.done += n
        now = time.perf_counter()
        if self.done < self.total and now - self.last >= self.every_s:
            self.last, elapsed = now, now - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{self.prefix} {self.what}: {self.done:,}/{self.total:,} {self.unit} "
                  f"({self.done / self.total:.0%}), {duration(elapsed)}, eta {duration(eta)}", flush=True)

    def finish(self, result: str = "") -> None:
        print(f"{self.prefix} {self.what}: done in {duration(time.perf_counter() - self.start)}{result}", flush=True)


class _Bar:
    """tqdm's bar with `Progress`'s interface, for a terminal."""

    def __init__(self, prefix: str, what: str, total: int, unit: str) -> None:
        self.bar = tqdm(desc=f"{prefix} {what}", total=total, unit=unit, leave=False, file=sys.stderr)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self, failed: bool = False) -> None:
        self.bar.close()


class _Lines(Progress):
    """`Progress` silent at the start, and at the end unless the work took longer than a line's interval."""

    def __init__(self, prefix: str, what: str, total: int, unit: str) -> None:
        super().__init__(prefix, what, total, unit, quiet_start=True)

    def close(self, failed: bool = False) -> None:
        if time.perf_counter() - self.start >= self.every_s:
            if failed:  # (not "done": the error that follows says why it stopped)
                print(f"{self.prefix} {self.what}: stopped after {self.done:,}/{self.total:,} {self.unit}, "
                      f"{duration(time.perf_counter() - self.start)}", flush=True)
            else:
                self.finish()


@contextlib.contextmanager
def counting(prefix: str, what: str, total: int, unit: str) -> Iterator[_Bar | _Lines]:
    """Something to `step(n)` as work gets done: a bar on a terminal, else a line at most every
    `EVERY_S` seconds and one at the end when the work took longer than that (short work stays
    silent in a log); work that raises ends on "stopped after", not "done". The bar draws on
    stderr, so stderr is the stream that must be a terminal (`dvc repro 2> log` keeps the log
    free of carriage returns)."""
    counter = _Bar(prefix, what, total, unit) if sys.stderr.isatty() else _Lines(prefix, what, total, unit)
    try:
        yield counter
    except GeneratorExit:  # the consumer of `progress` stopped taking items: its choice, not a failure
        counter.close()
        raise
    except BaseException:
        counter.close(failed=True)
        raise
    counter.close()


def progress(items: Iterable[T], prefix: str, what: str, total: int, unit: str) -> Iterator[T]:
    """`items`, counted by `counting` as the consumer takes each."""
    with counting(prefix, what, total, unit) as counter:
        for item in items:
            yield item
            counter.step()
