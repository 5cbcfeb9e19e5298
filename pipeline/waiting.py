"""Waiting for a service that may still be starting, with a bounded patience: the one loop the
train stage's reachability checks share."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until_answers(probe: Callable[[], None], timeout_s: float,
                       give_up: Callable[[OSError], BaseException], interval_s: float = 1.0) -> None:
    """Call `probe` until it returns; an OSError (refused, unreachable, timed out) is retried
    every `interval_s` until `timeout_s` has passed, then `give_up(last error)` is raised."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            probe()
            return
        except OSError as e:
            if time.monotonic() + interval_s > deadline:
                raise give_up(e) from None
            time.sleep(interval_s)
