"""`pipeline lineage` and `pipeline promote` against a real MLflow SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_secrets_are_never_params():
    from pipeline.tracking.mlflow_runs import safe_params

    kept = safe_params({"data.source": "s3://bucket/x", "aws_secret_access_key": "AKIA", "hf_token": "hf_x",
                        "db.password": "p", "optim.lr": 0.1, "cluster.api_key": "k"})
    assert kept == {"data.source": "s3://bucket/x", "optim.lr": "0.1"}
