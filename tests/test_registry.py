"""The register stage against a real MLflow SQLite store: what a version carries and says, that a
rerun reuses it, and that a logged model with damaged artifacts is never registered."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import main


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input



@pytest.fixture
def trained_lm(tmp_path, tiny_cfg):
    """What the train, evaluate and export stages leave for `register lm`: a run tagged as the train
    stage tags it (every dvc.lock hash, both tasks' stages; packages, Ray, kernels), its dataset
    inputs, an artifact standing in for the MLflow model, and export/lm + metrics/lm on disk."""
    import pipeline
    from pipeline.export.pyfunc import pyfunc_artifacts, pyfunc_staging
    from pipeline.flows.export import INFO
    from pipeline.tracking import mlflow_runs
    from pipeline.tracking.registry import shipped_files
    from pipeline.training.checkpoint import write_checksums

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)  # (artifacts under tmp_path: by default a SQLite store puts them in ./mlruns)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "registry-test", artifact_location=(tmp_path / "artifacts").as_uri()))
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
                                            artifacts={"model_dir": str(pyfunc_artifacts(export, staging))},
                                            code_paths=[str(Path(pipeline.__file__).parent)])
    mlflow_runs.log_datasets(run.info.run_id, "lm", "builtin:python-docs", "r" * 64, tmp_path, "man5", dvc)
    (export / INFO).write_text(json.dumps({"model_uri": model.model_uri, "run_id": run.info.run_id,
                                           "hf_architecture": "LlamaForCausalLM",
                                           "shipped_files": shipped_files(model.model_uri)}))
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
    from pipeline.tracking.registry import recorded_eval_config

    uri, run, export, metrics = trained_lm
    reg = register_export(tiny_cfg, "lm", export, metrics, tmp_path / "registry" / "lm.json")
    assert (reg.name, reg.version, reg.promoted) == ("pipeline-lm", "1", True)
    mv = MlflowClient().get_model_version("pipeline-lm", "1")
    assert mv.tags == {
        "task": "lm", "git.commit": "a" * 40, "git.dirty": "false", "config.digest": "cfg123",
        "data.manifest_md5": "man5", "data.raw_sha256": "r" * 64,
        "dvc.prepare:lm.data/lm/prepared": "p1.dir", "dvc.shard:lm.data/lm/shards": "s1.dir",
        "metric_name": "val_loss", "metric_value": "5.25", "greater_is_better": "false", "run_id": run.info.run_id,
        "model_uri": json.loads((export / "model_info.json").read_text())["model_uri"],
        # the evaluation it was registered on (eval.json), which `pipeline reproduce` compares with,
        **{f"eval/{k}": str(v) for k, v in json.loads((metrics / "eval.json").read_text()).items()},
        # and the eval config that scored it, which `pipeline reproduce` evaluates with
        "eval.config": mv.tags.get("eval.config"), "eval.config_digest": mv.tags.get("eval.config_digest"),
        "eval.scoring_digest": mv.tags.get("eval.scoring_digest")}
    assert mv.tags["eval/val_loss"] == "5.25"
    assert recorded_eval_config(mv.tags) == tiny_cfg.task("lm").eval.model_dump(mode="json")
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
    # the data stages' hashes only: the train stage recorded dvc.lock before its own entry was rewritten
    assert info["data"] == {"manifest_md5": "man5", **{k: v for k, v in mv.tags.items() if k.startswith("dvc.")},
                            "dvc.prepare:lm.pipeline/data": "c1.dir", "dvc.shard:lm.data/lm/prepared": "p1.dir"}
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
                                    "MLmodel deleted", "code/pipeline/atomic.py deleted",
                                    "code/pipeline/models/gpt.py changed", "python_model.pkl changed",
                                    "code/pipeline/evil.py added"])
def test_register_refuses_a_logged_model_whose_artifacts_are_damaged(trained_lm, tiny_cfg, tmp_path, damage):
    """The logged model's files are listed in the artifact store and compared with the export's
    record before a version exists: a deleted or truncated artifact is one line naming it. What
    runs before the served model can check anything (the pickled class, the code it imports) is
    read back and hashed too: a byte changed at the same size, or a module added, is named."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.file_utils import local_file_uri_to_path

    from pipeline.flows.export import INFO, register_export
    from pipeline.tracking.registry import MissingArtifacts

    _, _, export, metrics = trained_lm
    model_uri = json.loads((export / INFO).read_text())["model_uri"]
    root = Path(local_file_uri_to_path(MlflowClient().get_logged_model(model_uri.split("/")[-1]).artifact_location))
    name, how = damage.split()
    at_root = name == "MLmodel" or name.startswith(("code/", "python_model"))
    target = root / name if at_root else root / "artifacts" / name  # (MLflow 3's layout of a logged model)
    listed = name if at_root else f"artifacts/{name}"
    assert target.is_file() or how == "added", sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    if how == "deleted":
        target.unlink()
        want = rf"has no {listed} in its artifact store"
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:5])
        want = rf"has {listed} of 5 bytes in its artifact store, the export wrote [\d,]+"
    else:  # the same size, another byte; or a new module
        data = target.read_bytes() if how == "changed" else b"import os\n"
        target.write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])
        want = rf"ships other code than the export recorded: {re.escape(name)} \({how}\)"
    with pytest.raises(MissingArtifacts, match=rf"^the logged model {model_uri} {want}.*rerun the export stage "
                                               r"\(`dvc repro --force export@lm`\); nothing registered$"):
        register_export(tiny_cfg, "lm", export, metrics, tmp_path / "registry" / "lm.json")
    assert MlflowClient().search_registered_models() == [] and not (tmp_path / "registry").exists()
