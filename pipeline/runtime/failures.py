"""Why a training attempt failed, told from Ray's wrappers: whether retrying would only repeat it
(`fatal_error`: a damaged checkpoint, a full disk, a worker's config or input check, a non-finite
stop), the attempt in a few words for the driver's retry line (`_summary`: a worker that died is
named first), and the log filter that keeps those errors' worker tracebacks out of the log
(`_QuietKnownErrors`): the driver reports each in one line."""

from __future__ import annotations

import logging
import os
import re

from pipeline.training.checkpoint import (
    CannotReshard,
    CheckpointError,
    DamagedFile,
    StorageFull,
    StorageNotShared,
)


class _QuietKnownErrors(logging.Filter):
    """Ray logs every failed training function with its traceback; a damaged checkpoint or a
    full disk is reported by the driver in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        last = record.getMessage().rstrip().rsplit("\n", 1)[-1]
        if last.startswith(tuple(f"pipeline.training.checkpoint.{c.__name__}"
                                 for c in (CheckpointError, DamagedFile, StorageFull, StorageNotShared,
                                           CannotReshard))):
            return False
        if os.environ.get("PIPELINE_DEBUG"):  # (PIPELINE_DEBUG=1 keeps the traceback, as the stages do)
            return True
        # a survivor's collective cut short by a peer's death, in gloo's words: the driver's one line names
        # the worker that died (`_summary`); this traceback only says where the survivor was waiting
        if last.startswith("RuntimeError: [") and "gloo/transport/" in last and _PEER_LOST.search(last):
            return False
        # a config or input check, a non-finite stop (`recurring_error`): the driver reports it in one line, once
        return not last.startswith(_RECURRING_LINES) or "[Errno" in last


_RECURRING_LINES = ("ValueError: ", "KeyError: ", "pipeline.config.loading.ConfigError: ",
                    "pipeline.training.loop.NonFiniteError: ")




_RAY_WRAPPERS = ("_base_exc", "cause", "controller_failure")


def fatal_error(error: BaseException) -> BaseException | None:
    """The error behind a failed attempt that retrying would only repeat, if any: a checkpoint
    error (damaged file, full disk), else a worker's config or input check (`recurring_error`).
    Looks through Ray's wrappers (a worker group's failures, a task error's cause, the user
    exception Ray Train keeps with its traceback)."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointError):  # Ray's task errors subclass their cause: prefer the cause itself
            return e.cause if isinstance(getattr(e, "cause", None), CheckpointError) else e
        failures = getattr(e, "worker_failures", None) or {}
        todo += [failures[rank] for rank in sorted(failures)]
        todo += [getattr(e, name, None) for name in _RAY_WRAPPERS]
        todo += [e.__cause__]
    return recurring_error(error)


def _is_recurring(e: BaseException) -> bool:
    """A config or input check's error: bad config, a misshapen input (ValueError, ConfigError,
    KeyError); or the loop's non-finite stop (`NonFiniteError`): resume is exact, so a retry
    replays the same steps from the same checkpoint and diverges at the same step. A missing file
    is not, whoever names it: on a worker it may be a node without the shared mount yet, or a file
    gone with a node (the driver checks the inputs it can see before any run), and neither are
    Ray's own errors (a dead worker, a lost node) nor pyarrow's (the storage Ray Train writes
    checkpoints through)."""
    from pipeline.training.loop import NonFiniteError

    if type(e).__module__.split(".")[0] in ("ray", "pyarrow") or isinstance(e, OSError):
        return False
    return isinstance(e, ValueError | KeyError | NonFiniteError)


def recurring_error(error: BaseException) -> BaseException | None:
    """The worker's own exception when a failed attempt would fail identically on every retry:
    each failed worker of the group raised a config or input check's error (`ConfigError`,
    `ValueError`, `KeyError`) or stopped on non-finite losses (`NonFiniteError`) rather than
    dying, losing its node or missing a file. None when any worker failed otherwise (a killed
    worker, a lost node, a collective cut short, a missing file), or nothing recurring is found:
    that attempt is retried as before."""
    failures = getattr(error, "worker_failures", None)
    if failures:  # Ray Train's WorkerGroupError: the failed workers' own exceptions, by rank
        found = [_unwrap(failures[rank]) for rank in sorted(failures)]
        return found[0] if all(f is not None and _is_recurring(f) for f in found) else None
    unwrapped = _unwrap(error)
    return unwrapped if unwrapped is not None and _is_recurring(unwrapped) else None


def _unwrap(error: BaseException | None) -> BaseException | None:
    """The innermost user exception behind Ray's wrappers (Ray Train's exception-with-traceback,
    a task error's cause, a controller's failure)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        inner = next((x for x in (getattr(error, name, None) for name in _RAY_WRAPPERS)
                      if isinstance(x, BaseException)), None)
        if inner is None:
            return error
        error = inner
    return error


def _died(failure: BaseException) -> BaseException | None:
    """Ray's word that a worker's process or node is gone (an actor died, a worker crashed, a
    node died), looking through Ray Train's health-check and traceback wrappers; None when the
    worker failed on its own (it raised)."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    seen = set()
    while failure is not None and id(failure) not in seen:
        seen.add(id(failure))
        if isinstance(failure, RayActorError | WorkerCrashedError | NodeDiedError):
            return failure
        failure = next((x for x in (getattr(failure, name, None) for name in ("health_check_failure", *_RAY_WRAPPERS))
                        if isinstance(x, BaseException)), None)
    return None


def _summary(error: BaseException) -> str:
    """A failed attempt in a few words. A worker that died (killed, out of memory, its node lost)
    is named first, with its pid and node where Ray says them: the others then fail too, in a
    collective cut short ("Connection reset by peer"), and blaming the first rank would name a
    survivor. Otherwise the first worker's exception, its first line."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        if (dead := _died(failure)) is not None:
            text = str(dead)
            where = [f"{key} {m.group(1)}" for key, field_ in (("pid", "pid"), ("node", "ip"))
                     if (m := re.search(rf"^\s*{field_}: (\S+)$", text, re.MULTILINE))]
            # (unavailable: Ray cannot reach it, e.g. its node was lost; it may not have died)
            what = "became unreachable" if type(dead).__name__ == "ActorUnavailableError" else "died"
            return f"the worker of rank {rank} {what}{' (' + ', '.join(where) + ')' if where else ''}: " \
                   f"{type(dead).__name__}"
    rank, base = next(((r, getattr(f, "_base_exc", f)) for r, f in sorted(failures.items())), (None, error))
    lines = str(base).strip().splitlines()
    first = f"{type(base).__name__}: {lines[0][:200] if lines else ''}"
    if rank is not None and _PEER_LOST.search(first):  # the survivor's side of a death Ray has not reported
        return f"a worker died or lost its connection: rank {rank} lost its peer mid-collective ({first})"
    return first


# A collective's error on the rank that survived a peer's death (gloo's words)
_PEER_LOST = re.compile(r"Connection (reset|closed) by peer|remote worker crash")
