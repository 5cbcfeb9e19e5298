"""Ordered maps for prepare and shard: in-process, or as Ray tasks on whatever Ray the caller
connected to (the in-process local one or a cluster, as for training).

Results always come back in input order, so the prepared files and shards are byte-identical
whichever way they were computed (a test pins this). Work travels through Ray's object store,
not a shared file system, so tasks may run on any node of a cluster. At most `window` tasks
are in flight; finished results the driver has not reached yet wait in the object store,
which spills to disk under pressure, so memory stays bounded.

A task that raises surfaces here as the task's own exception (see `_raise_cause`), so a data
error reads the same one line whether it was computed in-process or as a Ray task.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


def _window(window: int | None) -> int:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("data.ray is set but Ray is not connected: call pipeline.runtime.connect() first")
    return window or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))


def _raise_cause(err: BaseException) -> NoReturn:
    """Raise the exception a Ray task raised, not Ray's wrapper of it.

    `ray.get` raises a `RayTaskError` that also subclasses the task's exception type, so the
    CLI's known-error handling catches it, but its text is Ray's whole remote traceback (with ANSI
    colour codes) instead of the one line in-process prepare prints, e.g. `a.jsonl:2: invalid
    JSON`. The original (`.cause`, unwrapped through nested task errors) is raised instead, chained
    `from` Ray's error: an unknown error's traceback still shows the remote frames, while a known
    one prints as the same line as in-process. A cause Ray could not carry (an unpicklable
    exception, replaced by a `RayError` whose text holds the traceback) is raised as that."""
    cause = err
    while isinstance(cause, _ray_task_error()) and isinstance(getattr(cause, "cause", None), BaseException):
        cause = cause.cause
    if cause is err:
        raise err
    raise cause from err


def _ray_task_error() -> type[BaseException]:
    """Ray's task-error class (imported late: Ray is optional unless `data.ray` is set)."""
    from ray.exceptions import RayTaskError

    return RayTaskError


def ordered_map(fn: Callable[[Any], T], items: Iterable[Any], use_ray: bool, window: int | None = None) -> Iterator[T]:
    """`map(fn, items)`, with each call a Ray task when `use_ray`."""
    if not use_ray:
        yield from map(fn, items)
        return
    import ray

    remote = ray.remote(fn)
    pending: deque = deque()
    size = _window(window)
    try:
        for item in items:
            pending.append(remote.remote(item))
            if len(pending) >= size:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    except ray.exceptions.RayTaskError as e:
        _raise_cause(e)


def ordered_flatmap(fn: Callable[[Any], Iterator[T]], items: Iterable[Any], use_ray: bool,
                    window: int | None = None, done: Callable[[], None] | None = None) -> Iterator[T]:
    """Everything `fn(item)` yields, item after item; with `use_ray`, each `fn(item)` is a Ray
    streaming-generator task, so one large input streams through the object store in pieces.
    `done()` is called as each item's last output has been taken: progress counts work finished,
    not tasks handed to Ray (which run a window ahead)."""
    if not use_ray:
        for item in items:
            yield from fn(item)
            if done is not None:
                done()
        return
    import ray

    remote = ray.remote(fn)
    pending: deque = deque()
    todo = iter(items)
    size = _window(window)
    try:
        for item in todo:
            pending.append(remote.remote(item))
            if len(pending) >= size:
                break
        while pending:
            for ref in pending.popleft():  # (a generator task's exception comes with its next ref)
                yield ray.get(ref)
            if done is not None:
                done()
            for item in todo:
                pending.append(remote.remote(item))
                break
    except ray.exceptions.RayTaskError as e:
        _raise_cause(e)
