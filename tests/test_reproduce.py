"""`pipeline lineage` against the workspace as it is on disk, and `pipeline reproduce`, in a real
git + DVC project with a real SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import main
from pipeline.tracking.lineage import git_state

_DVC_YAML = """\
stages:
  shard:
    foreach: [lm]
    do:
      cmd: python stages/shard.py ${item}
      params:
        - tasks.${item}.data
      outs:
        - data/${item}/shards
  train:
    foreach: [lm]
    do:
      cmd: python stages/train.py ${item}
      deps:
        - pipeline
        - data/${item}/shards
      params:
        - seed
        - tasks.${item}.optim
      outs:
        - models/${item}
  evaluate:
    foreach: [lm]
    do:
      cmd: python stages/evaluate.py ${item}
      deps:
        - stages/evaluate.py
        - models/${item}
      metrics:
        - metrics/${item}/eval.json:
            cache: false
"""



_STAGES = {
    "shard": "import pathlib, sys\np = pathlib.Path('data', sys.argv[1])\np.mkdir(parents=True, exist_ok=True)\n"
             "(p / 'shards').write_text('s')\n",
    "train": "import pathlib, sys\np = pathlib.Path('models', sys.argv[1])\np.mkdir(parents=True, exist_ok=True)\n"
             "(p / 'w').write_text(pathlib.Path('pipeline/code.py').read_text())\n",
    "evaluate": "import json, pathlib, sys\nimport ruamel.yaml  # in the venv only\n"
                "p = pathlib.Path('metrics', sys.argv[1])\np.mkdir(parents=True, exist_ok=True)\n"
                "(p / 'eval.json').write_text(json.dumps({'val_loss': 2.0}))\n",
}



def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=project,
                          capture_output=True, text=True, check=True).stdout



@pytest.fixture
def dvc_project(tmp_path, monkeypatch):
    """A small git + DVC project (shard, train and evaluate stages for task lm; `python` in the stages
    must be the venv's: evaluate imports ruamel), run and committed, and version m/1 registered from
    it with the tags the train stage writes (its dvc.lock hashes as they were before train ran)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.lineage import dvc_lock_hashes

    project = tmp_path / "project"
    (project / "pipeline").mkdir(parents=True)
    (project / "pipeline" / "code.py").write_text("x = 1\n")
    (project / "stages").mkdir()
    for name, code in _STAGES.items():
        (project / "stages" / f"{name}.py").write_text(code)
    (project / "params.yaml").write_text("seed: 1\ntasks:\n  lm:\n    optim: {lr: 0.1}\n    data: {n: 3}\n")
    (project / "dvc.yaml").write_text(_DVC_YAML)
    (project / ".gitignore").write_text("/metrics/\n")  # (not committed: a worktree of the commit evaluates)
    _git(project, "init", "-q")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=project, check=True)
    env = {**__import__("os").environ, "PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"}
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "-q"], cwd=project, check=True, env=env,
                   capture_output=True)
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "trained")
    uri = f"sqlite:///{tmp_path}/store/mlruns.db"
    (tmp_path / "store").mkdir()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("reproduce-test")
    client = MlflowClient()
    client.create_registered_model("m")
    with mlflow.start_run() as run:
        mlflow.set_tags({"task": "lm", "git.commit": git_state(project)["git.commit"], "git.dirty": "false",
                         **dvc_lock_hashes(project / "dvc.lock"), "dvc.train:lm.models/lm": "previous.dir",
                         # the train stage sees dvc.lock before the stages after it rewrite their entries
                         "dvc.evaluate:lm.models/lm": "previous.dir"})
        mlflow.log_metric("eval/val_loss", 2.0)
    client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("m", "champion", "1")
    monkeypatch.chdir(project)
    yield project, uri, run.info.run_id
    mlflow.set_tracking_uri(None)



def test_lineage_compares_the_workspace_on_disk(dvc_project, capsys):
    """"matches" is decided from the files as they are (`dvc status` of the task's chain and git's
    uncommitted changes), not from dvc.lock alone; what differs is named. The run's dvc.lock
    hashes of the stages from training on are the previous chain's (recorded before `dvc repro`
    rewrote them): only the data stages' are compared."""
    project, uri, _ = dvc_project
    main(["lineage", "m@champion", "--tracking-uri", uri])
    assert "  workspace  matches this workspace\n" in capsys.readouterr().out
    # what `dvc repro` itself rewrites (dvc.lock, the .gitignore files of its outputs) is no difference
    (project / "dvc.lock").write_text((project / "dvc.lock").read_text() + "# rewritten\n")
    (project / ".gitignore").write_text("/metrics/\n/other\n")
    main(["lineage", "m@champion", "--tracking-uri", uri])
    assert "  workspace  matches this workspace\n" in capsys.readouterr().out
    (project / "params.yaml").write_text("seed: 1\ntasks:\n  lm:\n    optim: {lr: 0.5}\n    data: {n: 3}\n")
    (project / "pipeline" / "code.py").write_text("x = 2\n")
    import shutil

    shutil.rmtree(project / "models" / "lm")
    main(["lineage", "m@champion", "--tracking-uri", uri, "--json"])
    ws = json.loads(capsys.readouterr().out)["workspace"]
    assert ws["matches"] is False and ws["same_commit"] and ws["dirty_now"] == "true"
    assert {"params tasks.lm.optim modified", "pipeline modified", "models/lm deleted"} <= set(ws["dvc_status"])
    assert ws["dirty_files"] == ["params.yaml", "pipeline/code.py"]
    main(["lineage", "m@champion", "--tracking-uri", uri])
    shown = capsys.readouterr().out
    assert "  workspace  differs from this workspace: uncommitted changes to 2 tracked files (params.yaml, " \
           "pipeline/code.py); " in shown and "params tasks.lm.optim modified" in shown
    assert "models/lm deleted" in shown and "matches this workspace" not in shown



def test_a_deleted_run_is_noted_and_a_collected_one_is_one_line(dvc_project, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _get_store

    _, uri, run_id = dvc_project
    MlflowClient().delete_run(run_id)
    main(["lineage", "m@1", "--tracking-uri", uri])
    assert f"  run        {run_id} (" in (out := capsys.readouterr().out) and " (run deleted);" in out
    _get_store()._hard_delete_run(run_id)  # what `mlflow gc` does
    for cmd in ("lineage", "reproduce"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "m@1", "--tracking-uri", uri])
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
            f"error: 'm@1' (m v1): its run {run_id} was deleted from the store {uri} (`mlflow gc`); its lineage "
            "is gone with it"]



def _venv_off_path(monkeypatch):
    import os

    venv = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv))



def _worktrees(project: Path) -> list[str]:
    return [line for line in _git(project, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")]



def test_reproduce_runs_stages_with_this_python_and_leaves_nothing_behind(dvc_project, tmp_path, monkeypatch):
    """Without the venv on PATH (`.venv/bin/python -m pipeline reproduce`), the stages' `python` is
    still this interpreter; the temporary worktree is gone afterwards."""
    import tempfile

    from pipeline.flows.reproduce import reproduce

    project, _, _ = dvc_project
    _venv_off_path(monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    rows, ok = reproduce("m@1", repo=project)
    assert ok and [(r.metric, r.reproduced) for r in rows] == [("val_loss", 2.0)]
    assert list((tmp_path / "tmp").iterdir()) == [] and len(_worktrees(project)) == 1



def test_reproduce_failure_is_one_line_and_cleans_up(dvc_project, tmp_path, capsys, monkeypatch):
    """A stage that fails: one line naming the worktree and where its output is; the temporary
    worktree removed; one the user named (--workdir) kept, with how to remove it."""
    import tempfile

    from mlflow.tracking import MlflowClient

    project, uri, _ = dvc_project
    (project / "stages" / "evaluate.py").write_text("raise SystemExit(3)\n")
    _git(project, "commit", "-qam", "evaluate fails")
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.set_tags({"task": "lm", "git.commit": git_state(project)["git.commit"], "git.dirty": "false"})
        mlflow.log_metric("eval/val_loss", 2.0)
    client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "m@2", "--tracking-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: reproducing m v2: `dvc repro evaluate@lm` failed "
                                                    "(exit "), err
    assert err[-1].endswith("; the failing stage's output is above; its worktree was removed")
    assert list((tmp_path / "tmp").iterdir()) == [] and len(_worktrees(project)) == 1
    kept = tmp_path / "kept"
    with pytest.raises(SystemExit):
        main(["reproduce", "m@2", "--tracking-uri", uri, "--workdir", str(kept)])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"the worktree stays at {kept} to look into; remove it with `git worktree remove --force {kept}`")
    assert (kept / "dvc.yaml").is_file() and len(_worktrees(project)) == 2



def test_reproduce_of_an_unknown_task_is_one_line(dvc_project, capsys):
    from mlflow.tracking import MlflowClient

    project, uri, _ = dvc_project
    with mlflow.start_run() as run:
        mlflow.set_tags({"task": "nope", "git.commit": git_state(project)["git.commit"], "git.dirty": "false"})
    MlflowClient().create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "m@2", "--tracking-uri", uri])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: 'm@2': its run's task 'nope' is not a task of commit {git_state(project)['git.commit'][:10]} "
        "(its params.yaml has lm); it cannot be reproduced"]
    assert len(_worktrees(project)) == 1
    for tolerance in ("-0.1", "nan", "inf"):  # refused before anything is checked out or run
        with pytest.raises(SystemExit) as e:
            main(["reproduce", "m@2", "--tracking-uri", uri, "--tolerance", tolerance])
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
            f"error: --tolerance: a finite relative difference, at least 0 (got {float(tolerance)})"]
    assert len(_worktrees(project)) == 1


# modules the data stages import that do not change what they write (config parsing, atomic writes,
# progress lines, the CLI's error handling): edits there leave the prepared data and shards valid
_DATA_STAGE_PLUMBING = ("pipeline/atomic.py", "pipeline/cli.py", "pipeline/config/", "pipeline/progress.py",
                        "pipeline/quiet.py", "pipeline/runtime/connect.py")


def test_dvc_stages_depend_on_the_code_they_run():
    """`dvc repro` reruns a stage when a dep changes. Evaluate, export and register listed only part
    of the code they run (not pipeline/flows, checkpoints, models, the registry's champion rules):
    the train stage reran on an edit there, wrote byte-identical weights, and every later stage was
    skipped as unchanged. Each stage's deps now cover the project modules `python -m stages.<name>`
    imports (the data stages' plumbing aside), and the stages after training depend on the whole
    package, whose modules they import as they go."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    probe = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); print(json.dumps(sorted("
             "m.__file__ for n, m in list(sys.modules.items()) if n.split('.')[0] in ('pipeline', 'stages') "
             "and getattr(m, '__file__', None))))")
    for name, stage in stages.items():
        if stage["do"].get("always_changed"):  # (source@<task>: runs on every repro, so it needs no deps)
            continue
        deps = [d.rstrip("/") for d in stage["do"]["deps"] if not d.startswith(("data/", "models/", "export/",
                                                                                   "metrics/"))]
        if name in ("train", "evaluate", "export", "register"):
            assert "pipeline" in deps, name
        files = json.loads(subprocess.run([sys.executable, "-c", probe, f"stages.{name}"], cwd=root,
                                          capture_output=True, text=True, check=True).stdout)
        loaded = [Path(f).resolve().relative_to(root).as_posix() for f in files]
        uncovered = [f for f in loaded if not f.endswith("__init__.py")
                     and not any(f == d or f.startswith(d + "/") for d in deps)
                     and not (name in ("prepare", "shard") and f.startswith(_DATA_STAGE_PLUMBING))]
        assert not uncovered, f"dvc.yaml's {name} stage does not depend on {uncovered}"


def test_reproduce_plan_applies_the_eval_config_the_version_was_scored_with(tmp_path):
    """The same run scored anew under another eval config is a new version of the same training
    commit: the version records that config (`eval.config`, with its digest), and reproduce writes
    it over the commit's `tasks.<task>.eval` (the rest of params.yaml as committed). A version
    without the record, or with one that does not match its digest, has none."""
    from mlflow.tracking import MlflowClient

    from pipeline.flows.reproduce import apply_eval_config, plan
    from pipeline.tracking.registry import eval_config_tags

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    try:
        client = MlflowClient()
        run = client.create_run(client.create_experiment("x"), tags={"git.commit": "a" * 40, "task": "lm"})
        client.create_registered_model("lm")
        scored = {"max_batches": 50, "batch_size": 8}
        tampered = {**eval_config_tags({"max_batches": 1}), "eval.config": '{"max_batches":2}'}
        for tags in ({"eval/val_loss": "2.5"}, {"eval/val_loss": "2.31", **eval_config_tags(scored)}, tampered):
            client.create_model_version("lm", f"runs:/{run.info.run_id}/model", run.info.run_id, tags=tags)
        assert [plan(f"lm/{v}")["eval_config"] for v in (1, 2, 3)] == [None, scored, None]
    finally:
        mlflow.set_tracking_uri(None)

    params = tmp_path / "params.yaml"
    params.write_text("seed: 1  # the seed\ntasks:\n  lm:\n    optim: {lr: 1e-3}\n"
                      "    eval:\n      max_batches: 10\n      batch_size: 8\n")
    assert apply_eval_config(params, "lm", scored)
    text = params.read_text()
    assert "seed: 1  # the seed\n" in text and "lr: 1e-3" in text  # (not rewritten as PyYAML would: '1e-3')
    import yaml

    assert yaml.safe_load(text)["tasks"]["lm"]["eval"] == scored
    assert not apply_eval_config(params, "lm", scored) and params.read_text() == text
    # a key the commit's schema did not have yet (recorded by a later register) is left out, not written
    assert not apply_eval_config(params, "lm", {**scored, "device": "cpu"}) and params.read_text() == text


_EVAL_READS_PARAMS = """\
import json, os, pathlib, sys
import yaml
sys.path.insert(0, {root!r})  # this project's tracking code, as a stage of the commit would run it
import mlflow
from pipeline.config.schema import TrackingConfig
from pipeline.tracking import mlflow_runs
params = yaml.safe_load(open('params.yaml'))
mlflow_runs.setup(TrackingConfig(**params['tracking']))
with mlflow.start_run():
    mlflow.log_metric('eval/val_loss', 2.0 * params['tasks'][sys.argv[1]]['eval']['scale'])
p = pathlib.Path('metrics', sys.argv[1])
p.mkdir(parents=True, exist_ok=True)
(p / 'eval.json').write_text(json.dumps({{'val_loss': 2.0 * params['tasks'][sys.argv[1]]['eval']['scale']}}))
"""


def test_reproduce_evaluates_as_the_version_was_scored_into_its_own_store(dvc_project, tmp_path, capsys):
    """A commit whose evaluation depends on `tasks.lm.eval` and whose `tracking.uri` names the
    shared store (an absolute SQLite path, as a server would be): version 2, the same training run
    scored anew under another eval config (scale 3: val_loss 6.0), reproduces with that config, not
    the commit's (scale 1: 2.0); the stages' runs go into the worktree's own store, and the shared
    one is untouched."""
    from mlflow.tracking import MlflowClient

    from pipeline.flows.reproduce import reproduce
    from pipeline.tracking.registry import eval_config_tags

    project, uri, _ = dvc_project
    root = str(Path(__file__).resolve().parents[1])
    (project / "stages" / "evaluate.py").write_text(_EVAL_READS_PARAMS.format(root=root))
    (project / "params.yaml").write_text(f"seed: 1\ntracking: {{uri: '{uri}', experiment: rerun}}\ntasks:\n  lm:\n"
                                         "    optim: {lr: 0.1}\n    data: {n: 3}\n    eval: {scale: 1}\n")
    _git(project, "commit", "-qam", "evaluation reads its config; the shared store")
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.set_tags({"task": "lm", "git.commit": git_state(project)["git.commit"], "git.dirty": "false"})
    for scale, loss in ((1, 2.0), (3, 6.0)):  # v2, v3: scored under two eval configs
        client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id,
                                    tags={"eval/val_loss": str(loss), **eval_config_tags({"scale": scale})})

    def shared_runs() -> int:
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    runs_before = shared_runs()
    kept = tmp_path / "kept"
    rows, ok = reproduce("m@3", workdir=kept, repo=project)
    assert ok and [(r.metric, r.original, r.reproduced) for r in rows] == [("val_loss", 6.0, 6.0)]
    assert "evaluating with the tasks.lm.eval m v3 was scored with, not commit " in capsys.readouterr().out
    assert client.search_experiments(filter_string="name = 'rerun'") == []  # the shared store: nothing new
    assert shared_runs() == runs_before
    own = MlflowClient(f"sqlite:///{kept}/mlruns.db")
    rerun = own.search_runs([own.get_experiment_by_name("rerun").experiment_id])
    assert [r.data.metrics for r in rerun] == [{"eval/val_loss": 6.0}]

    # a version registered before `eval.config`: evaluated as its commit says, and a difference is not
    # called "NOT reproduced" (it may be the eval config's)
    client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id, tags={"eval/val_loss": "6.0"})
    with pytest.raises(ValueError, match=r"^reproducing m v4: the metrics differ \(above\), but the version records "
                                         r"no eval config, so it may have been scored under another tasks.lm.eval "
                                         r"than commit \w{10}'s: whether it reproduces cannot be told$"):
        reproduce("m@4", repo=project)
    shown = capsys.readouterr().out
    assert "note: m v4 records no eval config (registered before versions did): evaluating with commit " in shown
    assert "val_loss" in shown and "<- beyond tolerance" in shown and len(_worktrees(project)) == 2  # (kept's)
