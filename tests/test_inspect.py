"""`pipeline lineage` and `pipeline promote` against a real MLflow SQLite store: references, aliases,
stores that fail or do not answer, and where the tracking URI and run.json point."""

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


def test_a_tracking_uri_given_on_the_command_line_waits_connect_timeout(capsys, monkeypatch):
    """With --tracking-uri no config is read, so the wait was always the 20 s default; the flag
    --connect-timeout sets it and the line names it."""
    import time

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(["lineage", "m@1", "--tracking-uri", "http://127.0.0.1:1", "--connect-timeout", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and time.monotonic() - start < 10
    assert err[-1].startswith("error: the MLflow tracking server at http://127.0.0.1:1 does not answer (")
    assert err[-1].endswith("waited 1 s, --connect-timeout)")
    with pytest.raises(SystemExit) as e:
        main(["lineage", "m@1", "--tracking-uri", "http://127.0.0.1:1", "--connect-timeout", "0"])
    assert capsys.readouterr().err.strip() == "error: --connect-timeout: must be positive (got 0.0)"



def test_a_failing_store_is_named_not_blamed_on_the_version(registered):
    import sqlite3

    from pipeline.tracking.mlflow_runs import sqlite_file

    sqlite3.connect(sqlite_file(registered)).execute("DROP TABLE model_versions")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "lineage", "m@1", "--tracking-uri", registered],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: the MLflow store {registered} fails (")
    assert "no such registered model version" not in proc.stderr



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


def test_git_state_is_clean_after_dvc_rewrote_its_lock(tmp_path):
    """`dvc repro` rewrites dvc.lock after each stage, so the train stage ran with ` M dvc.lock` in a
    clean checkout and tagged the run `git.dirty=true`: lineage never matched and reproduce warned of
    a dirty tree. dvc.lock and .gitignore (what DVC rewrites) do not count; any other file does."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    for name in ("dvc.lock", ".gitignore", "train.py"):
        (tmp_path / name).write_text("a\n")
    git("add", ".")
    git("commit", "-qm", "one")
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / ".gitignore").write_text("b\n")
    assert git_state(tmp_path)["git.dirty"] == "false"
    (tmp_path / "train.py").write_text("b\n")
    assert git_state(tmp_path)["git.dirty"] == "true"
