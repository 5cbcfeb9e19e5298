"""A run's storage folder, made safe to resume from before every attempt (`recover`): checkpoint
folders Ray Train never registered are removed, the checkpoint a resume would load is verified
against its checksums, and a damaged one is set aside (`<name>.damaged`) and dropped from Ray
Train's checkpoint list (`checkpoint_manager_snapshot.json`), so that Ray hands the workers the
newest intact one."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text
from pipeline.config.schema import PipelineConfig
from pipeline.config.storage import is_url
from pipeline.training.checkpoint import (
    DamagedFile,
    fallback_line,
    newest_intact,
    nothing_intact,
    read_meta,
)
from pipeline.training.session import SET_ASIDE, finish_interrupted_replace, step_of

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's registered checkpoints


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
                    and (p / "meta.json").is_file()), key=lambda p: step_of(p.name), reverse=True)
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
