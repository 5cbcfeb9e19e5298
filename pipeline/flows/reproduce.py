"""Re-run the pipeline for a registered model version and compare its metrics.

The version's run names the commit it was trained from. That commit is checked out into a
fresh git worktree (its committed params.yaml is the composed config it ran with), the eval
config the version was scored with (its `eval.config` tag: the same run scored anew under
another eval config is another version) replaces the commit's `tasks.<task>.eval`, its chain
is re-run with `dvc repro evaluate@<task>` from the raw data up, into the worktree's own
tracking store (`mlruns.db` in it, whatever the commit's `tracking.uri` names) and DVC cache,
and the evaluation metrics are compared with the version's. Nothing in the current workspace
or its registry is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.tracking.inspect import eval_tags, resolve, run_of
from pipeline.tracking.mlflow_runs import sqlite_store
from pipeline.tracking.registry import recorded_eval_config


@dataclass
class Comparison:
    metric: str
    original: float
    reproduced: float | None

    @property
    def rel_diff(self) -> float | None:
        if self.reproduced is None:
            return None
        return abs(self.reproduced - self.original) / max(abs(self.original), 1e-12)


def plan(ref: str) -> dict:
    """What reproducing `ref` means: the commit, the task, the eval config it was scored with
    (None where the version records none), and the metrics to compare."""
    client = MlflowClient()
    mv = resolve(client, ref)
    run = run_of(client, mv, ref)
    tags = run.data.tags
    commit, task = tags.get("git.commit", "unknown"), tags.get("task")
    if commit == "unknown" or not task:
        raise ValueError(f"'{ref}': its run {run.info.run_id} records no git commit or task; it cannot be reproduced")
    # the evaluation the version was registered on (its eval/* tags); versions registered before
    # those tags: the run's eval/* metrics, which are its latest evaluation's
    recorded = eval_tags(mv.tags) or {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    metrics = {k.removeprefix("eval/"): v for k, v in recorded.items()}
    return {"model": f"{mv.name} v{mv.version}", "run_id": run.info.run_id, "commit": commit, "task": task,
            "dirty": tags.get("git.dirty") == "true", "metrics": metrics, "eval_config": recorded_eval_config(mv.tags)}


def reproduce(ref: str, workdir: Path | None = None, tolerance: float = 1e-3,
              repo: Path = Path(".")) -> tuple[list[Comparison], bool]:
    p = plan(ref)
    if p["dirty"]:
        print(f"warning: {p['model']} was trained from a dirty work tree; commit {p['commit'][:10]} is only "
              "the nearest recorded code", flush=True)
    if workdir is not None and workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ValueError(f"--workdir {workdir}: exists and is not an empty folder (the commit is checked out there)")
    tasks = _tasks_at(p["commit"], repo)
    if tasks is not None and p["task"] not in tasks:
        raise ValueError(f"'{ref}': its run's task {p['task']!r} is not a task of commit {p['commit'][:10]} "
                         f"(its params.yaml has {', '.join(sorted(tasks)) or 'none'}); it cannot be reproduced")
    temp = None if workdir is not None else Path(tempfile.mkdtemp(prefix="reproduce-"))
    workdir = workdir or temp / "tree"
    added = subprocess.run(["git", "worktree", "add", "--detach", str(workdir), p["commit"]], cwd=repo,
                           capture_output=True, text=True)
    if added.returncode:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        why = (added.stderr.strip().splitlines() or ["no message"])[-1]
        raise ValueError(f"cannot check out commit {p['commit'][:10]} into {workdir}: git worktree add says: {why}")
    print(f"reproducing {p['model']} (run {p['run_id']}): commit {p['commit'][:10]} in {workdir}", flush=True)
    section = f"tasks.{p['task']}.eval"
    stage = f"evaluate@{p['task']}"
    cmd = [str(Path(sys.executable).parent / "dvc"), "repro", stage]
    # that commit's code, not this workspace's; the worktree's own store: the stages follow
    # MLFLOW_TRACKING_URI before tracking.uri, which may name a shared server or an absolute path
    env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"}
    env["MLFLOW_TRACKING_URI"] = sqlite_store(workdir.resolve() / "mlruns.db")
    env["PYTHONPATH"] = str(workdir)
    # the stages' `python` is this interpreter's (its venv), activated or not
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [os.environ.get("PATH")])])
    try:
        if p["eval_config"] is None:
            print(f"note: {p['model']} records no eval config (registered before versions did): evaluating with "
                  f"commit {p['commit'][:10]}'s {section}, which may not be the one it was scored with", flush=True)
        elif apply_eval_config(workdir / "params.yaml", p["task"], p["eval_config"]):
            print(f"evaluating with the {section} {p['model']} was scored with, not commit {p['commit'][:10]}'s",
                  flush=True)
        try:
            subprocess.run(cmd, cwd=workdir, check=True, env=env)
        except subprocess.CalledProcessError as e:
            kept = (f"the worktree stays at {workdir} to look into; remove it with `git worktree remove --force "
                    f"{workdir}`") if temp is None else "its worktree was removed"
            raise ValueError(f"reproducing {p['model']}: `dvc repro {stage}` failed (exit {e.returncode}) in "
                             f"{workdir}; the failing stage's output is above; {kept}") from None
        got = json.loads((workdir / "metrics" / p["task"] / "eval.json").read_text())
    finally:
        if temp is not None:
            _remove_worktree(workdir, temp, repo)
    rows = [Comparison(k, v, float(got[k]) if isinstance(got.get(k), (int, float)) else None)
            for k, v in sorted(p["metrics"].items())]
    ok = bool(rows) and all(r.rel_diff is not None and r.rel_diff <= tolerance for r in rows)
    if not ok and p["eval_config"] is None:  # a difference that may be the eval config's, not the model's
        print(format_comparison(rows, tolerance), flush=True)
        raise ValueError(f"reproducing {p['model']}: the metrics differ (above), but the version records no eval "
                         f"config, so it may have been scored under another {section} than commit "
                         f"{p['commit'][:10]}'s: whether it reproduces cannot be told")
    return rows, ok


def apply_eval_config(params: Path, task: str, block: dict) -> bool:
    """Set `tasks.<task>.eval` in the worktree's params.yaml to the eval config the version was
    scored with (a round trip: the rest stays as committed, comments and number forms too).
    Returns whether that changed it."""
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(params.read_text())
    section = data["tasks"][task]
    current = section.get("eval") or {}
    # keys added to the schema after the commit (recorded by a later register) it would refuse
    newer = sorted(set(block) - set(current))
    if newer:
        print(f"note: the recorded eval config's {', '.join(newer)} did not exist at this commit: left out",
              flush=True)
    block = {k: v for k, v in block.items() if k in current}
    if dict(current) == block:
        return False
    for k, v in block.items():
        current[k] = v
    section["eval"] = current
    with params.open("w") as f:
        yaml.dump(data, f)
    return True


def _tasks_at(commit: str, repo: Path) -> set[str] | None:
    """The tasks in `commit`'s params.yaml; None when it cannot be read (git worktree add then says why)."""
    import yaml

    shown = subprocess.run(["git", "show", f"{commit}:params.yaml"], cwd=repo, capture_output=True, text=True)
    if shown.returncode:
        return None
    try:
        return set((yaml.safe_load(shown.stdout) or {}).get("tasks") or {})
    except (yaml.YAMLError, AttributeError):
        return None


def _remove_worktree(workdir: Path, temp: Path, repo: Path) -> None:
    """A temporary worktree goes when reproduce ends: git forgets it, its folder is deleted."""
    removed = subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], cwd=repo, capture_output=True)
    shutil.rmtree(temp, ignore_errors=True)
    if removed.returncode:  # (its folder is gone now: git forgets it)
        subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def format_comparison(rows: list[Comparison], tolerance: float) -> str:
    lines = [f"{'metric':<28} {'registered':>14} {'reproduced':>14} {'rel. diff':>10}"]
    for r in rows:
        rep = f"{r.reproduced:14.6g}" if r.reproduced is not None else f"{'missing':>14}"
        diff = f"{r.rel_diff:10.2e}" if r.rel_diff is not None else f"{'-':>10}"
        flag = "" if r.rel_diff is not None and r.rel_diff <= tolerance else "  <- beyond tolerance"
        lines.append(f"{r.metric:<28} {r.original:14.6g} {rep} {diff}{flag}")
    return "\n".join(lines)
