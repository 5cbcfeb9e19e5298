"""`pipeline lineage` and `pipeline promote` against a real MLflow SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import main
from pipeline.tracking.lineage import git_state
from tests.conftest import ROOT


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """Two versions of a model whose runs carry the tags the train stage writes."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("lineage-test")  # other tests leave another store's experiment active
    client = MlflowClient()
    client.create_registered_model("m")
    for commit, metric in ((git_state(ROOT)["git.commit"], 2.0), ("0" * 40, 1.0)):
        with mlflow.start_run() as run:
            mlflow.set_tags({"task": "lm", "git.commit": commit, "git.dirty": "false", "data.manifest_md5": "abc",
                             "dvc.shard:lm.data/lm/shards": "d1.dir", "dvc.shard:diffusion.data/x": "zz"})
            mlflow.log_params({"tasks.lm.optim.lr": 0.001})
            mlflow.log_metric("eval/val_loss", metric)
            mlflow.log_text("x", "f.txt")
        client.create_model_version("m", f"runs:/{run.info.run_id}/f.txt", run.info.run_id,
                                    tags={"metric_name": "val_loss", "metric_value": str(metric)})
    client.set_registered_model_alias("m", "champion", "1")
    yield uri
    mlflow.set_tracking_uri(None)


def test_lineage_prints_the_chain(registered, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(["lineage", "m@champion", "--tracking-uri", registered, "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "m v1" and info["aliases"] == ["champion"]
    assert info["code"]["git_commit"] == git_state(ROOT)["git.commit"]
    assert info["data"] == {"manifest_md5": "abc", "dvc.shard:lm.data/lm/shards": "d1.dir"}  # this task only
    assert info["config"] == {"tasks.lm.optim.lr": "0.001"} and info["metrics"] == {"eval/val_loss": 2.0}
    assert info["workspace"]["same_commit"]


def test_promote_and_roll_back(registered, capsys):
    from mlflow.tracking import MlflowClient

    main(["promote", "m@2", "--tracking-uri", registered])
    assert MlflowClient().get_model_version_by_alias("m", "champion").version in (2, "2")
    main(["lineage", "m@champion", "--tracking-uri", registered])
    assert "differs from this workspace: other commit" in capsys.readouterr().out
    main(["promote", "m@1", "--tracking-uri", registered])  # roll back
    assert MlflowClient().get_model_version_by_alias("m", "champion").version in (1, "1")


def test_unknown_reference_is_one_line_and_exit_2(registered):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "lineage", "m@nope", "--tracking-uri", registered],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: 'm@nope': no such registered model version")


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    """MLFLOW_TRACKING_URI wins; a relative SQLite path lives in the DVC workspace (DVC_ROOT),
    which for `dvc queue` experiments is the original workspace, not the temporary copy."""
    from pipeline.config.schema import TrackingConfig
    from pipeline.tracking.mlflow_runs import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlruns.db"
    assert tracking_uri(TrackingConfig(uri="sqlite:////srv/m.db")) == "sqlite:////srv/m.db"
    assert tracking_uri(TrackingConfig(uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri(TrackingConfig()) == "http://mlflow:5000"


def test_run_file_names_a_store_inside_the_project_relative_to_it(monkeypatch, tmp_path):
    """run.json records a SQLite store inside the workspace relative to it, so a copied workspace
    (its mlruns.db with it) continues its runs in its own store, not the original's; a store
    elsewhere stays absolute (shared on purpose), a server as it is."""
    from pipeline.tracking.mlflow_runs import RUN_FILE, portable_store, read_run_file, resolve_store, sqlite_file

    original, copy = tmp_path / "original", tmp_path / "copy"
    monkeypatch.setenv("DVC_ROOT", str(original))
    assert portable_store(f"sqlite:///{original}/mlruns.db") == "sqlite:///mlruns.db"
    assert portable_store(f"sqlite:///{original}/db/m.db?timeout=5") == "sqlite:///db/m.db?timeout=5"
    assert portable_store(f"sqlite:///{tmp_path}/shared.db") == f"sqlite:///{tmp_path}/shared.db"
    assert portable_store("sqlite:///mlruns.db") == "sqlite:///mlruns.db"
    assert portable_store("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    (copy / "models").mkdir(parents=True)
    (copy / "models" / RUN_FILE).write_text(json.dumps({"run_id": "r", "tracking_uri": "sqlite:///mlruns.db"}))
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert read_run_file(copy / "models")["tracking_uri"] == f"sqlite:///{copy}/mlruns.db"
    # a path with a space, as SQLAlchemy reads the URI (escaped), and one reached through a link
    spaced = tmp_path / "my project"
    (spaced / "db").mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(spaced))
    assert sqlite_file(f"sqlite:///{tmp_path}/my%20project/db/m.db") == spaced / "db" / "m.db"
    assert portable_store(f"sqlite:///{tmp_path}/my%20project/db/m.db") == "sqlite:///db/m.db"
    assert resolve_store("sqlite:///db/m.db") == f"sqlite:///{tmp_path}/my%20project/db/m.db"
    (tmp_path / "link").symlink_to(spaced)
    assert portable_store(f"sqlite:///{tmp_path}/link/db/m.db") == "sqlite:///db/m.db"


def test_secrets_are_never_params():
    from pipeline.tracking.mlflow_runs import safe_params

    kept = safe_params({"data.source": "s3://bucket/x", "aws_secret_access_key": "AKIA", "hf_token": "hf_x",
                        "db.password": "p", "optim.lr": 0.1, "cluster.api_key": "k"})
    assert kept == {"data.source": "s3://bucket/x", "optim.lr": "0.1"}


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture
def trained_lm(tmp_path, tiny_cfg):
    """What the train, evaluate and export stages leave for `register lm`: a run tagged as the train
    stage tags it (every dvc.lock hash, both tasks' stages; packages, Ray, kernels), its dataset
    inputs, an artifact standing in for the MLflow model, and export/lm + metrics/lm on disk."""
    from pipeline.export.pyfunc import pyfunc_artifacts, pyfunc_staging
    from pipeline.flows.export import INFO
    from pipeline.tracking import mlflow_runs
    from pipeline.training.checkpoint import write_checksums

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    dvc = {"dvc.prepare:lm.data/lm/prepared": "p1.dir", "dvc.prepare:lm.pipeline/data": "c1.dir",
           "dvc.shard:lm.data/lm/prepared": "p1.dir", "dvc.shard:lm.data/lm/shards": "s1.dir",
           "dvc.train:lm.pipeline": "c2.dir", "dvc.train:lm.models/lm": "m0.dir",
           "dvc.shard:diffusion.data/diffusion/shards": "zz.dir", "dvc.train:diffusion.models/diffusion": "zy.dir"}
    run_name = mlflow_runs.run_name("lm", tiny_cfg.task("lm").model, "ddp")
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"task": "lm", "git.commit": "a" * 40, "git.dirty": "false", "data.manifest_md5": "man5",
                         "config.digest": "cfg123", "model.preset": "gpt_tiny", "model.parameters": "104832",
                         "strategy": "ddp", "precision": "fp32", "cluster.workers": "2", "ray.run_name": "lm-x",
                         "ray.cluster": "local", "env.torch": "2.13.0", "impl.optimizer": "foreach", **dvc})
        mlflow.log_params({"data.source": "builtin:python-docs", "model.preset": "gpt_tiny", "trainer.max_steps": 6})
        mlflow.log_metrics({"train/steps": 6, "eval/val_loss": 5.25})
        export = tmp_path / "export" / "lm"
        export.mkdir(parents=True)
        (export / mlflow_runs.RUN_FILE).write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
        (export / "model_spec.json").write_text(json.dumps({"task": "lm"}))
        write_checksums(export)  # as the export stage does, and its model folder with them, as log_pyfunc does
        with pyfunc_staging(tmp_path) as staging:
            model = mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=[],
                                            artifacts={"model_dir": str(pyfunc_artifacts(export, staging))})
    mlflow_runs.log_datasets(run.info.run_id, "lm", "builtin:python-docs", "r" * 64, tmp_path, "man5", dvc)
    (export / INFO).write_text(json.dumps({"model_uri": model.model_uri,
                                           "run_id": run.info.run_id, "hf_architecture": "LlamaForCausalLM"}))
    write_checksums(export, add=(INFO,))
    metrics = tmp_path / "metrics" / "lm"
    metrics.mkdir(parents=True)
    (metrics / "eval.json").write_text(json.dumps({"val_loss": 5.25, "val_perplexity": 190.6, "test_loss": 5.3}))
    (metrics / "eval_run.json").write_text(json.dumps({"run_id": run.info.run_id}))  # the run evaluate scored
    yield uri, run, export, metrics
    mlflow.set_tracking_uri(None)


def test_registry_description_says_what_was_trained_and_how_to_load_it(trained_lm, tiny_cfg, tmp_path, capsys,
                                                                      monkeypatch):
    """A registered version carries its own lineage only (this task's data stages, commit, config
    digest, data hashes) under a few names, and a description a person can read; the full chain
    stays one `pipeline lineage` away."""
    from mlflow.tracking import MlflowClient

    from pipeline.flows.export import register_export

    uri, run, export, metrics = trained_lm
    reg = register_export(tiny_cfg, "lm", export, metrics, tmp_path / "registry" / "lm.json")
    assert (reg.name, reg.version, reg.promoted) == ("pipeline-lm", "1", True)
    mv = MlflowClient().get_model_version("pipeline-lm", "1")
    assert mv.tags == {
        "task": "lm", "git.commit": "a" * 40, "git.dirty": "false", "config.digest": "cfg123",
        "data.manifest_md5": "man5", "data.raw_sha256": "r" * 64,
        "dvc.prepare:lm.data/lm/prepared": "p1.dir", "dvc.shard:lm.data/lm/shards": "s1.dir",
        "metric_name": "val_loss", "metric_value": "5.25", "run_id": run.info.run_id,
        "model_uri": json.loads((export / "model_info.json").read_text())["model_uri"]}
    assert not any("diffusion" in k for k in mv.tags)  # not the other task's stages
    text = mv.description
    first = text.splitlines()[0]
    assert first.startswith("lm · gpt_tiny (105K parameters) · ddp on 2 workers, fp32 · val_loss 5.25 · trained ")
    assert run.info.run_name.startswith("lm-tiny-ddp-20")
    assert len(run.info.run_name) == len("lm-tiny-ddp-2026-12-02T2031")
    for part in ("trained 6 steps with `ddp` on 2 workers (fp32) on `builtin:python-docs`",
                 "| **val_loss** (registry metric, lower is better) | **5.25** |", "| val_perplexity | 190.6 |",
                 f"- MLflow run `{run.info.run_name}` ({run.info.run_id})",
                 f"- git commit `{'a' * 40}` (clean); config digest `cfg123`",
                 f"- data: raw examples sha256 `{'r' * 64}`; `data/lm/prepared` (`prepare:lm`) `p1.dir`; "
                 "`data/lm/shards` (`shard:lm`) `s1.dir`; shard manifest md5 `man5`",
                 "`python -m pipeline lineage pipeline-lm/1`", f'mlflow.set_tracking_uri("{uri}")',
                 'mlflow.pyfunc.load_model("models:/pipeline-lm@champion")',
                 'mlflow.pyfunc.load_model("models:/pipeline-lm/1")',
                 "model.predict(pandas.DataFrame({'prompt': ['The for statement', 'A class is']}))",
                 "**As a Hugging Face model** (LlamaForCausalLM)", 'unwrap_python_model().dir / "hf"'):
        assert part in text, part
    assert "zz.dir" not in text and "env.torch" not in text
    assert "@champion" in MlflowClient().get_registered_model("pipeline-lm").description
    # the code in the description runs
    namespace = {}
    exec(text.split("```python\n")[1].split("```")[0], namespace)
    assert list(namespace["model"].predict(namespace["pandas"].DataFrame({"prompt": ["x"]}))["prompt"]) == ["x"]

    # the full chain is still one command away: every hash of this task's stages, the datasets, the run
    monkeypatch.chdir(tmp_path)
    main(["lineage", "pipeline-lm@champion", "--tracking-uri", uri, "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["data"] == {"manifest_md5": "man5", **{k: v for k, v in mv.tags.items() if k.startswith("dvc.")},
                            "dvc.prepare:lm.pipeline/data": "c1.dir", "dvc.shard:lm.data/lm/prepared": "p1.dir",
                            "dvc.train:lm.pipeline": "c2.dir", "dvc.train:lm.models/lm": "m0.dir"}
    assert {i["name"] for i in info["inputs"]} == {"lm-raw", "lm-prepare", "lm-shard"}
    assert info["run"]["name"] == run.info.run_name and info["registered_metric"] == {"val_loss": "5.25"}


def test_register_twice_reuses_the_version_and_sets_the_aliases_again(trained_lm, tiny_cfg, tmp_path, capsys,
                                                                      monkeypatch):
    """A rerun of the register stage on the same export and evaluation (`dvc repro --force`, a retried
    job) finds the version it registered and sets the aliases again: no copy of the model. The same
    model scored anew (another evaluation config) is a new version carrying its own score."""
    from mlflow.tracking import MlflowClient

    from pipeline.flows.export import register_export
    from stages.register import run as register_stage

    _, _, export, metrics = trained_lm
    first = register_export(tiny_cfg, "lm", export, metrics, tmp_path / "registry" / "lm.json")
    client = MlflowClient()
    client.update_model_version("pipeline-lm", "1", description="")  # as if the first run stopped before it
    again = register_export(tiny_cfg, "lm", export, metrics, tmp_path / "registry" / "lm.json")
    assert (first.version, first.reused, first.promoted) == ("1", False, True)
    assert (again.version, again.reused, again.promoted, again.previous_champion) == ("1", True, False, "1")
    assert [str(v.version) for v in client.search_model_versions("name='pipeline-lm'")] == ["1"]
    assert client.get_model_version("pipeline-lm", "1").description.startswith("lm · gpt_tiny")  # mended
    assert json.loads((tmp_path / "registry" / "lm.json").read_text())["reused"] is True
    monkeypatch.chdir(tmp_path)  # the stage reads export/lm and metrics/lm where the fixture wrote them
    register_stage(tiny_cfg, "lm")
    assert "already registered as pipeline-lm v1 (val_loss=5.2500), alias challenger; champion\n" in \
        capsys.readouterr().out
    (metrics / "eval.json").write_text(json.dumps({"val_loss": 5.0, "val_perplexity": 148.4, "test_loss": 5.1}))
    scored = register_export(tiny_cfg, "lm", export, metrics, tmp_path / "registry" / "lm.json")
    assert (scored.version, scored.reused, scored.promoted, scored.previous_champion) == ("2", False, True, "1")
    assert client.get_model_version("pipeline-lm", "2").tags["metric_value"] == "5.0"
    assert "| **val_loss** (registry metric, lower is better) | **5** |" in \
        client.get_model_version("pipeline-lm", "2").description


@pytest.mark.parametrize("damage", ["model_dir/model_spec.json deleted", "model_dir/run.json truncated",
                                    "MLmodel deleted"])
def test_register_refuses_a_logged_model_whose_artifacts_are_damaged(trained_lm, tiny_cfg, tmp_path, damage):
    """The logged model's files are listed in the artifact store (not downloaded) and compared with the
    export's record before a version exists: a deleted or truncated artifact is one line naming it."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.file_utils import local_file_uri_to_path

    from pipeline.flows.export import INFO, register_export
    from pipeline.tracking.registry import MissingArtifacts

    _, _, export, metrics = trained_lm
    model_uri = json.loads((export / INFO).read_text())["model_uri"]
    root = Path(local_file_uri_to_path(MlflowClient().get_logged_model(model_uri.split("/")[-1]).artifact_location))
    name, how = damage.split()
    target = root / name if name == "MLmodel" else root / "artifacts" / name  # (MLflow 3's layout of a logged model)
    assert target.is_file(), sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    if how == "deleted":
        target.unlink()
        want = rf"has no {'MLmodel' if name == 'MLmodel' else 'artifacts/' + name} in its artifact store"
    else:
        target.write_bytes(target.read_bytes()[:5])
        want = rf"has artifacts/{name} of 5 bytes in its artifact store, the export wrote [\d,]+"
    with pytest.raises(MissingArtifacts, match=rf"^the logged model {model_uri} {want}.*rerun the export stage "
                                               r"\(`dvc repro --force export@lm`\); nothing registered$"):
        register_export(tiny_cfg, "lm", export, metrics, tmp_path / "registry" / "lm.json")
    assert MlflowClient().search_registered_models() == [] and not (tmp_path / "registry").exists()


# --- lineage against the workspace as it is, an unreachable or failing store, deleted runs, alias names,
# --- and reproduce (a real git + DVC project, a real SQLite store)

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
                         **dvc_lock_hashes(project / "dvc.lock"), "dvc.train:lm.models/lm": "previous.dir"})
        mlflow.log_metric("eval/val_loss", 2.0)
    client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("m", "champion", "1")
    monkeypatch.chdir(project)
    yield project, uri, run.info.run_id
    mlflow.set_tracking_uri(None)


def test_lineage_compares_the_workspace_on_disk(dvc_project, capsys):
    """"matches" is decided from the files as they are (`dvc status` of the task's chain and git's
    uncommitted changes), not from dvc.lock alone; what differs is named."""
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


def _down_params(tmp_path) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"] = {**raw.get("tracking", {}), "uri": "http://127.0.0.1:1", "connect_timeout_s": 1}
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("argv", [["lineage", "m@1"], ["promote", "m@1", "--alias", "champion"],
                                  ["reproduce", "m@1"]])
def test_a_tracking_server_that_does_not_answer_is_one_line(argv, tmp_path, capsys, monkeypatch):
    """A server that is down is named in one line after tracking.connect_timeout_s, not blamed on the
    version after MLflow's minutes of retries."""
    import time

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--params", str(_down_params(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and time.monotonic() - start < 30
    assert err[-1].startswith("error: the MLflow tracking server at http://127.0.0.1:1 does not answer (")
    assert err[-1].endswith("waited 1 s, tracking.connect_timeout_s)") and "no such" not in err[-1]


def test_a_failing_store_is_named_not_blamed_on_the_version(registered):
    import sqlite3

    from pipeline.tracking.mlflow_runs import sqlite_file

    sqlite3.connect(sqlite_file(registered)).execute("DROP TABLE model_versions")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "lineage", "m@1", "--tracking-uri", registered],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: the MLflow store {registered} fails (")
    assert "no such registered model version" not in proc.stderr


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


@pytest.mark.parametrize("alias", ["v1", "V2", "latest", "Latest", "bad alias", "3", "", "a.b", "x" * 256])
def test_promote_refuses_an_alias_mlflow_refuses_or_that_reads_as_a_version(alias, registered, capsys):
    from mlflow.tracking import MlflowClient

    with pytest.raises(SystemExit) as e:
        main(["promote", "m@2", "--alias", alias, "--tracking-uri", registered])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: --alias {alias!r}: "), err
    assert {k: str(v) for k, v in MlflowClient().get_registered_model("m").aliases.items()} == {"champion": "1"}


def test_promote_accepts_mlflows_alias_names(registered):
    from mlflow.tracking import MlflowClient

    main(["promote", "m@2", "--alias", "v1-candidate_2", "--tracking-uri", registered])
    assert MlflowClient().get_model_version_by_alias("m", "v1-candidate_2").version in (2, "2")


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
