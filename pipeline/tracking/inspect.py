"""Answer "where did this model come from?" for a registered version, and move aliases by hand."""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking.lineage import dvc_lock_hashes, git_state


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
        raise ValueError(f"'{ref}': no such registered model version ({e.message.splitlines()[0]})") from None


def lineage(ref: str) -> dict[str, Any]:
    """Model version -> run -> config -> data hashes -> git commit, and whether this workspace still matches."""
    client = MlflowClient()
    mv = resolve(client, ref)
    run = client.get_run(mv.run_id)
    tags = run.data.tags
    task = tags.get("task", "")
    # dvc.<stage>:<task>.<path>: keep this task's chain only
    dvc_recorded = {k: v for k, v in tags.items()
                    if k.startswith("dvc.") and k.split(".", 2)[1].endswith(f":{task}")}
    dvc_now = dvc_lock_hashes()
    git_now = git_state()
    changed = sorted(k for k, v in dvc_recorded.items() if dvc_now.get(k) != v) if dvc_now else ["(no dvc.lock here)"]
    same_commit = git_now["git.commit"] == tags.get("git.commit")
    return {
        "model": f"{mv.name} v{mv.version}", "aliases": sorted(mv.aliases), "registered_metric":
            {mv.tags.get("metric_name", "?"): mv.tags.get("metric_value", "?")},
        "run": {"id": run.info.run_id, "name": run.info.run_name, "experiment": run.info.experiment_id,
                "ray_run": tags.get("ray.run_name"), "cluster": tags.get("ray.cluster"),
                "workers": tags.get("cluster.workers"), "strategy": tags.get("strategy"),
                "precision": tags.get("precision")},
        "config": dict(sorted(run.data.params.items())),
        "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(("eval/", "export/"))},
        "data": {"manifest_md5": tags.get("data.manifest_md5"), **dvc_recorded},
        "inputs": [{"name": i.dataset.name, "digest": i.dataset.digest, "source": i.dataset.source,
                    **{t.key: t.value for t in i.tags if t.key.startswith("digest")}}
                   for i in (run.inputs.dataset_inputs if run.inputs else [])],
        "init_from": ({"path": tags["init_from.path"], "fingerprint": tags.get("init_from.fingerprint")}
                      if "init_from.path" in tags else None),
        "hf_export": tags.get("export.hf_architecture"),
        "code": {"git_commit": tags.get("git.commit"), "dirty_at_training": tags.get("git.dirty")},
        "workspace": {"git_commit": git_now["git.commit"], "same_commit": same_commit,
                      "dirty_now": git_now["git.dirty"], "dvc_hashes_changed": changed,
                      "matches": same_commit and not changed},
    }


def format_lineage(info: dict[str, Any]) -> str:
    ws = info["workspace"]
    lines = [f"{info['model']}  aliases: {', '.join(info['aliases']) or '-'}  {info['registered_metric']}",
             f"  run        {info['run']['id']} ({info['run']['name']}); Ray run {info['run']['ray_run']} on "
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
    verdict = "matches this workspace" if ws["matches"] else (
        "differs from this workspace: " + ("other commit " + ws["git_commit"][:10] if not ws["same_commit"] else "")
        + (f" changed DVC hashes: {', '.join(ws['dvc_hashes_changed'])}" if ws["dvc_hashes_changed"] else ""))
    lines.append(f"  workspace  {verdict}")
    return "\n".join(lines)


def promote(ref: str, alias: str) -> str:
    """Point `alias` at the version `ref` names (promotion or roll-back by hand)."""
    client = MlflowClient()
    mv = resolve(client, ref)
    client.set_registered_model_alias(mv.name, alias, mv.version)
    return f"{mv.name}@{alias} -> v{mv.version}"
