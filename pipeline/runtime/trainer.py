"""Run the training loop on Ray Train workers with `TorchTrainer`.

The run is named by a digest of its config and data, under `cluster.storage_path`: rerunning
the same configuration after an interruption resumes from its latest checkpoint, while a
changed configuration starts a fresh run instead of resuming a stale one.

Damaged state: before every attempt, `recover` checks the run's storage folder. Checkpoint
folders Ray Train never registered (a write cut short by a crash or a full disk) are removed;
the checkpoint a resume would load is verified against its checksums, and a damaged one is set
aside (`<name>.damaged`) and dropped from Ray Train's checkpoint list
(`checkpoint_manager_snapshot.json`), so that Ray hands the workers the newest intact one. A
failed attempt is retried here, up to `cluster.max_failures` times (Ray Train itself is told
not to retry: its `FailureConfig` cannot tell errors apart); a damaged file, a full disk, or a
worker's config or input check or a non-finite stop (`recurring_error`: it would fail the same
way every time, resume being exact) is not retried, it ends the run in one line.

Paths: the workers run in another folder than the stage (Ray's session folder), so every local
path they are handed is absolute: the shards and the storage folder, and the weights a run starts
from (`absolute_init_paths`), resolved against the folder the stage runs in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text
from pipeline.config.schema import PipelineConfig
from pipeline.config.storage import is_url
from pipeline.distributed import process_group_backend
from pipeline.training.checkpoint import (
    CannotReshard,
    CheckpointError,
    DamagedFile,
    StorageFull,
    StorageNotShared,
    fallback_line,
    newest_intact,
    nothing_intact,
    read_meta,
)
from pipeline.training.session import finish_interrupted_replace

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's registered checkpoints
SET_ASIDE = ".damaged"


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


def nodes_line(task: str, ips: list[Any]) -> str:
    """`[task] N worker(s) on M node(s): <ip> (ranks ...); ...` from each rank's node IP, in rank
    order: on a cluster, the first thing to check when a run is slower than it should be, or a
    rendezvous reached the wrong address."""
    by_node: dict[str, list[int]] = {}
    for r, ip in enumerate(ips):
        by_node.setdefault(str(ip), []).append(r)
    nodes = "; ".join(f"{ip} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                      for ip, rs in by_node.items())
    return f"[{task}] {len(ips)} worker(s) on {len(by_node)} node(s): {nodes}"


def _announce_nodes(task: str, rank: int, world: int) -> None:
    """Rank 0 prints `nodes_line`."""
    import ray
    import torch.distributed as dist

    ip = ray.util.get_node_ip_address()
    ips: list[Any] = [ip]
    if world > 1 and dist.is_initialized():
        ips = [None] * world
        dist.all_gather_object(ips, ip)
    if rank == 0:
        print(nodes_line(task, ips), flush=True)


def _worker(config: dict[str, Any]) -> None:
    from pipeline.config import validate
    from pipeline.training.loop import train
    from pipeline.training.session import RaySession

    logging.getLogger("ray.train.v2._internal.util").addFilter(_QuietKnownErrors())
    import ray.train

    from pipeline.tracking.live import LiveMetrics, node_monitor

    live, ctx = config.get("live"), ray.train.get_context()
    sink = LiveMetrics(live["run_id"], live["tracking_uri"]) if live and ctx.get_world_rank() == 0 else None
    session = RaySession(config.get("verified"), live=sink)
    _announce_nodes(config["task"], ctx.get_world_rank(), ctx.get_world_size())
    # system metrics of every training node (its local rank 0), not only of the driver's
    node = f"node-{ray.get_runtime_context().get_node_id()[:8]}"
    monitor = node_monitor(live["run_id"], live["tracking_uri"], node) \
        if live and ctx.get_local_rank() == 0 else contextlib.nullcontext()
    try:
        with monitor:
            train(validate(config["cfg"]), config["task"], config["shards"], session)
    finally:
        session.close()


def absolute_init_paths(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with every task's `model.init_from` and `trainer.init_from` made absolute, resolved
    against the folder the stage runs in (the project's root), as the shards and the storage folder
    are: a Ray worker runs in a folder of its own, where a relative path names nothing. URLs
    (s3://...) and absolute paths are left as they are; the same `cfg` when nothing changes."""

    def absolute(path: str | None) -> str | None:
        return path if not path or is_url(path) or Path(path).is_absolute() else str(Path(path).resolve())

    tasks = {}
    for name, tcfg in cfg.tasks.items():
        update = {}
        model_path = getattr(tcfg.model, "init_from", None)
        if absolute(model_path) != model_path:
            update["model"] = tcfg.model.model_copy(update={"init_from": absolute(model_path)})
        if absolute(tcfg.trainer.init_from) != tcfg.trainer.init_from:
            update["trainer"] = tcfg.trainer.model_copy(update={"init_from": absolute(tcfg.trainer.init_from)})
        tasks[name] = tcfg.model_copy(update=update) if update else tcfg
    if all(tasks[name] is cfg.tasks[name] for name in tasks):
        return cfg
    return cfg.model_copy(update={"tasks": tasks})


def worker_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as the workers get it (`validate` runs again there): plain JSON, local paths absolute."""
    return absolute_init_paths(cfg).model_dump(mode="json")


def storage_root(cfg: PipelineConfig) -> str:
    path = cfg.cluster.storage_path
    return path if is_url(path) else str(Path(path).resolve())


def registered_metrics(run_dir: Path) -> dict[str, Any]:
    """The metrics (a history entry: step, workers, ...) of the newest checkpoint Ray Train's
    controller has registered for a run; {} if none yet. A checkpoint folder on disk counts only
    once it is listed here: one the controller never took in is not resumed from."""
    try:
        metrics = json.loads((run_dir / SNAPSHOT).read_text())["latest_checkpoint_result"]["metrics"]
        return metrics if isinstance(metrics, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or mid-write
        return {}


def registered_step(run_dir: Path) -> int:
    """The step of the newest registered checkpoint (0 if none yet)."""
    return int(registered_metrics(run_dir).get("step", 0))


@dataclass
class Recovery:
    """What `recover` found in a run's storage folder before training (re)started."""

    resumed_step: int | None = None  # the checkpoint training resumes from (None: from scratch)
    verified: str | None = None  # its folder name, checked against its checksums
    damaged: list[str] = field(default_factory=list)  # damaged files, newest checkpoint first
    set_aside: list[str] = field(default_factory=list)  # checkpoint folders renamed *.damaged
    removed: list[str] = field(default_factory=list)  # unfinished checkpoint folders deleted

    def tags(self) -> dict[str, str]:
        """For the MLflow run: what was damaged, and where training resumed instead."""
        if not self.damaged:
            return {}
        return {"checkpoint.damaged": self.damaged[0], "checkpoint.damaged_count": str(len(self.damaged)),
                "checkpoint.resumed_from_step": str(self.resumed_step)}


def run_dir_of(cfg: PipelineConfig, run_name: str) -> Path | None:
    """The run's storage folder on this machine (None for remote storage such as s3://)."""
    root = storage_root(cfg)
    return None if is_url(root) else Path(root) / run_name


def recover(cfg: PipelineConfig, task_name: str, run_name: str) -> Recovery | None:
    """Make the run's storage folder safe to resume from (see the module docstring); prints one
    line when it removed or set anything aside. None when there is no local folder to check (a
    fresh run, or remote storage: the workers check what they are given). With no intact
    checkpoint left, raises `CheckpointError` (one line) and changes nothing."""
    run_dir = run_dir_of(cfg, run_name)
    if run_dir is None or not run_dir.is_dir():
        return None
    if cfg.strategy.name == "horovod":  # LocalSession's layout: checkpoint_<step>, staged as .tmp
        return _recover_steps(run_dir, task_name)
    return _recover_ray(run_dir, task_name)


def _set_aside(directory: Path) -> str:
    target = directory.with_name(directory.name + SET_ASIDE)
    if target.exists():
        shutil.rmtree(target)
    directory.rename(target)
    return target.name


def _removed_line(task_name: str, run_dir: Path, removed: list[str]) -> None:
    if removed:
        print(f"[{task_name}] removed {len(removed)} unfinished checkpoint folder(s) under {run_dir} "
              f"({', '.join(sorted(removed))}): a write was cut short", flush=True)


def remove_unfinished(run_dir: Path, task_name: str = "", set_aside: bool = True) -> list[str]:
    """Delete the checkpoint folders of a Ray run that Ray Train never registered: a write a
    crash or a full disk cut short (Ray copies each rank's part straight under the final name).

    Without Ray's list at all (its snapshot file missing: the run stopped before its first
    checkpoint was registered, or the file was lost), a folder that holds the loop's `meta.json`
    may be a complete checkpoint: it is set aside (renamed, kept, not resumed from) rather than
    deleted; folders without it are deleted. `set_aside=False` (after a full disk, which the
    run's first checkpoint hit: its folders are half-written and their space is wanted) deletes."""
    registered = set()
    snapshot = run_dir / SNAPSHOT
    listed = snapshot.is_file()
    if listed:
        try:
            registered = {e["checkpoint_dir_name"] for e in json.loads(snapshot.read_text())["checkpoint_results"]}
        except (ValueError, KeyError, TypeError):
            return []  # an unreadable list: touch nothing (`recover` names the file)
    removed, kept = [], []
    for p in sorted(run_dir.glob("checkpoint_*")):
        if p.is_dir() and p.name not in registered and not p.name.endswith(SET_ASIDE):
            if set_aside and not listed and (p / "meta.json").is_file():
                kept.append(_set_aside(p))
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if kept:
        print(f"[{task_name or 'train'}] {run_dir / SNAPSHOT} (Ray Train's list of checkpoints) is missing: set aside "
              f"{len(kept)} checkpoint folder(s) it would have listed, not resumed from ({', '.join(kept)})",
              flush=True)
    return removed


def _recover_ray(run_dir: Path, task_name: str) -> Recovery:
    found = Recovery(removed=remove_unfinished(run_dir, task_name))
    _removed_line(task_name, run_dir, found.removed)
    path = run_dir / SNAPSHOT
    if not path.is_file():
        return found
    try:
        snapshot = json.loads(path.read_text())
        entries = list(zip(snapshot["checkpoint_report_indices"], snapshot["checkpoint_results"], strict=True))
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedFile(path, f"{type(e).__name__}; it is Ray Train's list of this run's checkpoints: delete "
                                f"{run_dir} to train the run from scratch") from None
    if not entries:
        return found
    entries.sort(key=lambda item: item[0], reverse=True)  # newest first
    intact, damaged = newest_intact([run_dir / e["checkpoint_dir_name"] for _, e in entries])
    if intact is None:
        raise nothing_intact(damaged, run_dir)
    bad = {e["checkpoint_dir_name"] for _, e in entries[:len(damaged)]}
    bad |= {e["checkpoint_dir_name"] for _, e in entries if not (run_dir / e["checkpoint_dir_name"]).is_dir()}
    found.verified, found.resumed_step = intact.name, int(read_meta(intact)["step"])
    if not bad:
        return found
    found.damaged = [e.path for e in damaged]
    found.set_aside = [_set_aside(run_dir / name) for name in sorted(bad) if (run_dir / name).is_dir()]
    keep = [(i, e) for i, e in sorted(entries, key=lambda item: item[0]) if e["checkpoint_dir_name"] not in bad]
    snapshot["checkpoint_results"] = [e for _, e in keep]
    snapshot["checkpoint_report_indices"] = [i for i, _ in keep]
    snapshot["latest_checkpoint_result"] = keep[-1][1]
    pending = [(r, v) for r, v in zip(snapshot.get("pending_training_results", []),
                                      snapshot.get("pending_validation_specs", []), strict=False)
               if r["checkpoint_dir_name"] not in bad]
    snapshot["pending_training_results"] = [r for r, _ in pending]
    snapshot["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snapshot:
            snapshot[key] = [name for name in snapshot[key] if name not in bad]
    atomic_write_text(path, json.dumps(snapshot))
    _fallback_line(task_name, found, damaged, intact)
    if missing := sorted(bad - {e["checkpoint_dir_name"] for _, e in entries[:len(damaged)]}):
        print(f"[{task_name}] dropped {len(missing)} missing checkpoint folder(s) from Ray Train's list in {path} "
              f"({', '.join(missing)})", flush=True)
    return found


def _recover_steps(run_dir: Path, task_name: str) -> Recovery:
    import re

    found = Recovery()
    finish_interrupted_replace(run_dir)
    for stale in sorted(run_dir.glob("checkpoint_*.tmp")):
        shutil.rmtree(stale, ignore_errors=True)
        found.removed.append(stale.name)
    _removed_line(task_name, run_dir, found.removed)
    steps = sorted((p for p in run_dir.glob("checkpoint_*") if re.fullmatch(r"checkpoint_\d+", p.name)
                    and (p / "meta.json").is_file()), reverse=True)
    if not steps:
        return found
    intact, damaged = newest_intact(steps)
    if intact is None:
        raise nothing_intact(damaged, run_dir)
    found.verified, found.resumed_step = intact.name, int(read_meta(intact)["step"])
    if damaged:
        found.damaged = [e.path for e in damaged]
        found.set_aside = [_set_aside(p) for p in steps[:len(damaged)]]
        _fallback_line(task_name, found, damaged, intact)
    return found


def _fallback_line(task_name: str, found: Recovery, damaged: list[DamagedFile], intact: Path) -> None:
    if damaged:
        aside = f"; set aside as {', '.join(found.set_aside)}" if found.set_aside else ""
        print(f"[{task_name}] {fallback_line(damaged, found.resumed_step or 0, intact)}{aside}", flush=True)


# Where Ray keeps the exception it wraps: Ray Train's exception-with-traceback, a task error's
# cause, a controller's failure.
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


def fit(cfg: PipelineConfig, task_name: str, shards: str, run_name: str, live: dict[str, str] | None = None):
    """Train on Ray; returns the `ray.train.Result` (or its Horovod equivalent). Horovod brings
    its own launcher (RayExecutor). A failed attempt is retried from the last checkpoint up to
    `cluster.max_failures` times, then its error is raised; a damaged checkpoint file or a full
    disk raises `CheckpointError` (one line) at once, and a worker's config or input check
    (`recurring_error`) raises that worker's own exception at once (the stage prints its message).

    `shards` is where every worker reads the shards: an absolute local path (one node or a
    shared file system) or a URL such as s3://... (cached on each node). `live` (run_id,
    tracking_uri) makes rank 0 log the per-step history to that MLflow run while it trains."""
    cfg = absolute_init_paths(cfg)  # the workers run in another folder
    if cfg.strategy.name == "horovod":
        from pipeline.runtime.horovod import fit_horovod

        recover(cfg, task_name, run_name)
        result = fit_horovod(cfg, task_name, shards, Path(storage_root(cfg)) / run_name, live)
        if result.error is not None and (fatal := fatal_error(result.error)) is not None:
            raise _final(fatal, cfg, run_name) from None
        return result
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from pipeline.config.elastic import worker_counts
    from pipeline.runtime.connect import embedded
    from pipeline.runtime.embedded_trainer import embedded_trainer_class, remove_leftover_placement_groups
    from pipeline.runtime.rendezvous import torch_config

    cl, counts = cfg.cluster, worker_counts(cfg)
    trainer_class = embedded_trainer_class() if embedded() else TorchTrainer
    no_cleaner = trainer_class is not TorchTrainer  # the lean trainer runs without Ray Train's placement-group cleaner
    for attempt in range(cl.max_failures + 1):
        found = recover(cfg, task_name, run_name)
        if no_cleaner:
            remove_leftover_placement_groups()
        trainer = trainer_class(
            train_loop_per_worker=_worker,
            train_loop_config={"cfg": worker_config(cfg), "task": task_name, "shards": shards,
                               "verified": found.verified if found else None, "live": live},
            # a range makes Ray Train start with the workers the cluster has room for (elastic)
            scaling_config=ScalingConfig(num_workers=(counts.start, counts.stop - 1) if len(counts) > 1
                                         else cl.num_workers, use_gpu=cl.use_gpu,
                                         resources_per_worker={"CPU": cl.cpus_per_worker},
                                         elastic_resize_monitor_interval_s=cl.resize_check_s),
            torch_config=torch_config(process_group_backend(cfg.strategy, cl.use_gpu), single_node=embedded()),
            run_config=RunConfig(
                name=run_name, storage_path=storage_root(cfg),
                failure_config=FailureConfig(max_failures=0),  # retried here, where errors can be told apart
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.task(task_name).trainer.keep_last_k),
                logging_config=LoggingConfig(log_level="WARNING"),  # our own progress lines say enough
            ),
        )
        try:
            return trainer.fit()
        except WorkerGroupError as e:
            if (fatal := fatal_error(e)) is not None:
                raise _final(fatal, cfg, run_name) from None
            if attempt == cl.max_failures:
                raise
            print(f"[{task_name}] training attempt {attempt + 1} of {cl.max_failures + 1} failed ({_summary(e)}); "
                  "restarting from the last checkpoint", flush=True)
        except Exception as e:
            if (fatal := fatal_error(e)) is not None:
                raise _final(fatal, cfg, run_name) from None
            raise
    raise AssertionError("unreachable")


def _final(fatal: BaseException, cfg: PipelineConfig, run_name: str) -> BaseException:
    """The error a run ends with, once the half-written checkpoint folders it left are gone (a
    worker's config or input error: as the worker raised it)."""
    run_dir = run_dir_of(cfg, run_name)
    if not isinstance(fatal, CheckpointError) or run_dir is None or not run_dir.is_dir():
        return fatal
    if cfg.strategy.name == "horovod":
        removed = [p.name for p in run_dir.glob("checkpoint_*.tmp")]
        for name in removed:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    else:
        removed = remove_unfinished(run_dir, set_aside=not isinstance(fatal, StorageFull))
    if removed and isinstance(fatal, StorageFull):
        return StorageFull(f"{fatal}; removed the unfinished checkpoint folder(s) {', '.join(sorted(removed))}")
    return fatal
