"""Answer "where did this model come from?" for a registered version, and move aliases by hand."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking.lineage import dirty_files, dvc_lock_hashes, git_state
from pipeline.tracking.mlflow_runs import TrackingUnavailable
from pipeline.tracking.registry import DATA_STAGES


def check_store(uri: str, connect_timeout_s: float | None = None, key: str = "tracking.connect_timeout_s") -> None:
    """Before any MLflow call: a tracking server that does not answer within `connect_timeout_s`
    (default: tracking.connect_timeout_s's default) is one line naming it and the setting `key`
    that gave the wait, not MLflow's minutes of silent retries ending in a message that blames the
    version. Other stores need no check."""
    from pipeline.config.schema import TrackingConfig
    from pipeline.tracking.mlflow_runs import check_reachable

    cfg = TrackingConfig(uri=uri) if connect_timeout_s is None else \
        TrackingConfig(uri=uri, connect_timeout_s=connect_timeout_s)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # (check_reachable follows the environment first: check this URI)
    try:
        check_reachable(cfg, say=lambda *a, **k: print(*a, **{**k, "file": sys.stderr}))
    except TrackingUnavailable as e:
        msg = str(e).removesuffix("; nothing was trained")
        raise TrackingUnavailable(msg.replace(" s, tracking.connect_timeout_s)", f" s, {key})")) from None
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _store_failed(e: MlflowException) -> TrackingUnavailable:
    first = (e.message.strip().splitlines() or [e.error_code])[0]
    return TrackingUnavailable(f"the MLflow store {mlflow.get_tracking_uri()} fails ({first})")


def resolve(client: MlflowClient, ref: str):
    """`name@alias`, `name@3` or `name/3` -> ModelVersion."""
    sep = "@" if "@" in ref else "/"
    if sep not in ref:
        raise ValueError(f"'{ref}': expected <model>@<alias>, <model>@<version> or <model>/<version>")
    name, which = ref.split(sep, 1)
    try:
        if which.isdigit():
            return client.get_model_version(name, which)
        return client.get_model_version_by_alias(name, which)
    except MlflowException as e:
        # (an unknown alias of a known model is INVALID_PARAMETER_VALUE "Registered model alias x not found.")
        missing = e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            not which.isdigit() and e.error_code == "INVALID_PARAMETER_VALUE" and "alias" in e.message
            and "not found" in e.message)
        if not missing:
            raise _store_failed(e) from None
        raise ValueError(f"'{ref}': no such registered model version ({e.message.splitlines()[0]})") from None


def eval_tags(tags: dict[str, str]) -> dict[str, float]:
    """A version's eval/* tags as numbers (the evaluation the register stage registered it on)."""
    out = {}
    for key, value in tags.items():
        if key.startswith("eval/"):
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def run_of(client: MlflowClient, mv, ref: str):
    """The version's run; one line when the store no longer has it (`mlflow gc` after a delete)."""
    try:
        return client.get_run(mv.run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"'{ref}' ({mv.name} v{mv.version}): its run {mv.run_id} was deleted from the store "
                             f"{mlflow.get_tracking_uri()} (`mlflow gc`); its lineage is gone with it") from None
        raise _store_failed(e) from None


def _dvc_differences(task: str) -> list[str]:
    """What `dvc status` finds changed in this workspace for the task's chain up to its training
    (`train@<task>` and the stages it depends on): params keys, deps and outs, e.g.
    ["params tasks.lm.optim modified", "pipeline modified", "models/lm deleted"]."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    target = f"train@{task}"
    try:
        with Repo() as repo:
            status = repo.status(targets=[target], with_deps=True)
    except DvcException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return [f"no DVC stage {target} here ({first})"]
    out: list[str] = []

    def add(item: str) -> None:
        if item not in out:
            out.append(item)

    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):  # "always changed", "changed checksum", ...
                if change != "always changed":  # (source@<task> always is: its record is compared below)
                    add(f"{stage} {change}")
                continue
            for kind, entries in change.items():
                if not isinstance(entries, dict):  # "changed command"
                    add(f"{stage} {kind}")
                    continue
                for path, what in entries.items():
                    if isinstance(what, dict):  # a params file: key -> modified/new/deleted
                        for key, how in what.items():
                            add(f"params {key} {how}")
                    else:
                        add(f"{path} {what}")
    return out


def _source_changed(task: str) -> tuple[list[str], list[str]]:
    """(differences, notes): whether the raw data, or the weights training starts from, differ from
    the records prepare and train last depended on (`data/<task>/source.json` and `init_from.json`,
    which `dvc status` cannot know without running their stage); a source not readable on this
    machine (raw data not pulled) is a note, not a difference."""
    from pipeline.config import load_config
    from pipeline.data.fingerprint import SourceUnavailable, init_fingerprint, source_fingerprint

    source, weights = Path(f"data/{task}/source.json"), Path(f"data/{task}/init_from.json")
    if not (source.is_file() or weights.is_file()) or not Path("params.yaml").is_file():
        return [], []  # (`dvc status` names a missing record)
    try:
        tcfg = load_config("params.yaml").task(task)
    except (ValueError, KeyError, OSError) as e:
        return [f"data source unreadable ({e})"], []
    init_from = getattr(tcfg.model, "init_from", None)
    checks = ((source, "data source", "the raw data source is not readable here, so it was not compared",
               lambda: source_fingerprint(tcfg.data.source, tcfg.data.kind, init_from)),
              (weights, "init_from weights", "the init_from weights are not readable here, so they were not compared",
               lambda: init_fingerprint(init_from or tcfg.trainer.init_from)))
    differences, notes = [], []
    for record, what, unreadable, now in checks:
        if not record.is_file():
            continue
        try:
            if json.loads(record.read_text()) != now():
                differences.append(f"{what} changed since {record} was recorded")
        except SourceUnavailable as e:  # (not here: nothing to compare, which is no difference found)
            notes.append(f"{unreadable} ({e})")
        except (ValueError, KeyError, OSError) as e:
            differences.append(f"{what} unreadable ({e})")
    return differences, notes


def _git_dirty_files() -> list[str]:
    """`lineage.dirty_files` of this folder; none outside a git checkout."""
    try:
        return dirty_files()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return []


def _workspace(tags: dict[str, str], task: str, dvc_recorded: dict[str, str]) -> dict[str, Any]:
    """Whether this workspace, as it is on disk, is what the version was trained with: the same
    commit and no uncommitted change to tracked files; `dvc status` clean for the task's chain
    (params, code, data and model on disk as dvc.lock records them); and dvc.lock's hashes of the
    chain's data the ones the run recorded."""
    git_now = git_state()
    same_commit = git_now["git.commit"] == tags.get("git.commit")
    dvc_now = dvc_lock_hashes()
    changed = sorted(k for k, v in dvc_recorded.items() if dvc_now.get(k) != v) if dvc_now else []
    differs = [] if same_commit else [f"other commit {git_now['git.commit'][:10]}"]
    if tags.get("git.dirty") == "true":
        differs.append("trained from uncommitted changes (not recorded)")
    dirty = _git_dirty_files()
    if dirty:
        differs.append(f"uncommitted changes to {len(dirty)} tracked file{'s' if len(dirty) > 1 else ''} ("
                       + ", ".join(dirty[:3]) + (", ..." if len(dirty) > 3 else "") + ")")
    status = (["the run records no task"] if not task else _dvc_differences(task) if dvc_now else
              ["no dvc.lock here (the pipeline has not run in this workspace)"])
    source, notes = _source_changed(task) if task and dvc_now else ([], [])
    status += source
    differs += status
    if changed:
        differs.append("dvc.lock hashes " + ", ".join(changed))
    return {"git_commit": git_now["git.commit"], "same_commit": same_commit, "dirty_now": git_now["git.dirty"],
            "dirty_files": dirty, "dvc_status": status, "dvc_hashes_changed": changed, "differs": differs,
            "matches": not differs, "notes": notes}


def lineage(ref: str) -> dict[str, Any]:
    """Model version -> run -> config -> data hashes -> git commit, and whether this workspace still matches."""
    client = MlflowClient()
    mv = resolve(client, ref)
    run = run_of(client, mv, ref)
    tags = run.data.tags
    task = tags.get("task", "")
    # dvc.<stage>:<task>.<path> of this task's data stages: the train stage records dvc.lock as it is
    # before its own entry is written, so its train, evaluate, export and register hashes are the
    # previous chain's (a normal `dvc repro` rewrote them after, and lineage reported a difference)
    data_stages = tuple(f"dvc.{stage}:{task}." for stage, _ in DATA_STAGES)
    dvc_recorded = {k: v for k, v in tags.items() if k.startswith(data_stages)}
    return {
        "model": f"{mv.name} v{mv.version}", "aliases": sorted(mv.aliases), "registered_metric":
            {mv.tags.get("metric_name", "?"): mv.tags.get("metric_value", "?")},
        "run": {"id": run.info.run_id, "name": run.info.run_name, "experiment": run.info.experiment_id,
                "deleted": run.info.lifecycle_stage == "deleted",
                "ray_run": tags.get("ray.run_name"), "cluster": tags.get("ray.cluster"),
                "workers": tags.get("cluster.workers"), "strategy": tags.get("strategy"),
                "precision": tags.get("precision")},
        "config": dict(sorted(run.data.params.items())),
        # the evaluation this version was registered on (its eval/* tags; the run holds its latest)
        "metrics": dict(sorted({**{k: v for k, v in run.data.metrics.items() if k.startswith(("eval/", "export/"))},
                                **eval_tags(mv.tags)}.items())),
        "data": {"manifest_md5": tags.get("data.manifest_md5"), **dvc_recorded},
        "inputs": [{"name": i.dataset.name, "digest": i.dataset.digest, "source": i.dataset.source,
                    **{t.key: t.value for t in i.tags if t.key.startswith("digest")}}
                   for i in (run.inputs.dataset_inputs if run.inputs else [])],
        "init_from": ({"path": tags["init_from.path"], "fingerprint": tags.get("init_from.fingerprint")}
                      if "init_from.path" in tags else None),
        "hf_export": tags.get("export.hf_architecture"),
        "code": {"git_commit": tags.get("git.commit"), "dirty_at_training": tags.get("git.dirty")},
        "workspace": _workspace(tags, task, dvc_recorded),
    }


def format_lineage(info: dict[str, Any]) -> str:
    ws = info["workspace"]
    lines = [f"{info['model']}  aliases: {', '.join(info['aliases']) or '-'}  {info['registered_metric']}",
             f"  run        {info['run']['id']} ({info['run']['name']})"
             + (" (run deleted)" if info["run"].get("deleted") else "") + f"; Ray run {info['run']['ray_run']} on "
             f"{info['run']['cluster']}, {info['run']['workers']} workers, {info['run']['strategy']}, "
             f"{info['run']['precision']}",
             f"  code       git {info['code']['git_commit']} (dirty at training: {info['code']['dirty_at_training']})",
             f"  data       shard manifest md5 {info['data']['manifest_md5']}"]
    lines += [f"             {k} = {v}" for k, v in info["data"].items() if k.startswith("dvc.")]
    lines += [f"  input      {i['name']}: {i.get('digest_full', i['digest'])} ({i.get('digest_kind', 'digest')}) "
              f"from {i['source']}" for i in info.get("inputs", [])]
    if info.get("init_from"):
        lines.append(f"  started    from {info['init_from']['path']} (sha256 {info['init_from']['fingerprint']})")
    if info.get("hf_export"):
        lines.append(f"  exported   as a transformers folder: {info['hf_export']}")
    lines += ["  metrics    " + ", ".join(f"{k}={v:.4g}" for k, v in info["metrics"].items())]
    lines += [f"  config     {len(info['config'])} params, e.g. " + ", ".join(
        f"{k}={v}" for k, v in list(info["config"].items())[:4])]
    verdict = "matches this workspace" if ws["matches"] else "differs from this workspace: " + "; ".join(ws["differs"])
    lines.append(f"  workspace  {verdict}")
    lines += [f"  note       {n}" for n in ws.get("notes", [])]
    return "\n".join(lines)


# as MLflow's registry checks an alias (mlflow.utils.validation._validate_model_alias_name and
# _validate_model_alias_name_reserved), plus digits only: `<model>@3` reads version 3 here
_ALIAS = re.compile(r"^[\w\-]*$")
_MAX_ALIAS = 255


def check_alias(alias: str) -> None:
    """One line for an alias MLflow refuses or reserves, or that `<model>@<alias>` would read as a version."""
    why = ("is empty" if not alias else
           "may only contain letters, digits, underscores (_) and dashes (-)" if not _ALIAS.match(alias) else
           f"is longer than {_MAX_ALIAS} characters" if len(alias) > _MAX_ALIAS else
           "is reserved by MLflow (the newest version)" if alias.lower() == "latest" else
           "is reserved by MLflow (a version's name)" if re.fullmatch(r"[vV]\d+", alias) else
           "is all digits: <model>@<digits> reads a version number" if alias.isdigit() else None)
    if why:
        raise ValueError(f"--alias {alias!r}: {why}; choose a name such as champion or challenger")


def promote(ref: str, alias: str) -> str:
    """Point `alias` at the version `ref` names (promotion or roll-back by hand)."""
    check_alias(alias)
    client = MlflowClient()
    mv = resolve(client, ref)
    client.set_registered_model_alias(mv.name, alias, mv.version)
    return f"{mv.name}@{alias} -> v{mv.version}"
