"""Export and registry against a real MLflow SQLite store: ONNX parity, pyfunc round trip,
and the challenger/champion alias rule."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config.schema import RegistryConfig, TrackingConfig
from pipeline.export.load_alone import LoadAloneError, check_loads_alone, check_loads_here
from pipeline.export.onnx_export import export_onnx
from pipeline.export.pyfunc import PipelineModel, example_input, log_pyfunc
from pipeline.tasks import task_for_spec
from pipeline.tracking import mlflow_runs
from pipeline.tracking.registry import CHALLENGER, CHAMPION, register
from pipeline.training.checkpoint import CHECKSUMS, model_checksums, verify_model_dir, write_checksums, write_model


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns.db", artifact_dir=str(tmp_path / "art"))
    mlflow_runs.setup(cfg)
    yield cfg
    mlflow.set_tracking_uri(None)


def _model_dir(tmp_path, built_data, task):
    from pipeline.data.shard_format import load_manifest
    from pipeline.tasks import task_named

    cfg, shards = built_data
    t = task_named(task)
    spec = t.model_spec(cfg.task(task), load_manifest(shards[task]))
    torch.manual_seed(0)
    model = t.build(spec)
    d = tmp_path / f"model-{task}"
    write_model(d, {k: v.clone() for k, v in model.state_dict().items()}, spec)
    if task == "lm":
        (d / "tokenizer.json").write_bytes((shards[task] / "tokenizer.json").read_bytes())
    return d, spec


@pytest.mark.parametrize("task", ["lm", "diffusion"])
def test_onnx_matches_pytorch(built_data, tmp_path, task):
    d, spec = _model_dir(tmp_path, built_data, task)
    model = task_for_spec(spec).build(spec)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(d / "model.safetensors")))
    diff = export_onnx(model.eval(), spec, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 0 and diff < 1e-4


def test_int8_onnx_is_quantized_and_scored(built_data, tmp_path):
    """The int8 graph really holds int8 MatMuls, is smaller, and scores close to the fp32 graph
    on the same validation rows (the model is untrained, so its logits are near-uniform)."""
    import onnx

    from pipeline.export.quantize import accuracy_change, quantize_int8

    shards = built_data[1]
    d, spec = _model_dir(tmp_path, built_data, "lm")
    model = task_for_spec(spec).build(spec)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(d / "model.safetensors")))
    export_onnx(model.eval(), spec, tmp_path / "m.onnx")
    quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    report = accuracy_change(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", shards["lm"], 16, batch=8)
    assert report["int8_size_ratio"] < 0.7
    assert abs(report["int8_val_perplexity_change"]) < 0.05 and report["int8_max_abs_logit_diff"] > 0
    assert report["fp32_val_loss"] > 0 and report["int8_val_loss"] > 0


@pytest.mark.parametrize("task", ["lm", "diffusion"])
def test_pyfunc_round_trip(built_data, tmp_path, mlflow_store, task):
    """The logged model, downloaded from the artifact store, loads and predicts in a fresh process
    that sees only its requirements and its code/ (not this checkout's `pipeline`), exactly what it
    predicted here; its files sit under artifacts/model_dir whatever the exporter's (atomic,
    temporary) folder was called, without the ONNX files the run carries beside it, and no staging
    folder is left behind."""
    d, spec = _model_dir(tmp_path, built_data, task)
    d = d.rename(d.parent / ".lm.tmp-abc123")
    (d / "model.onnx").write_bytes(b"graph")
    write_checksums(d)  # as the export stage records its folder before logging
    with mlflow.start_run():
        info, expected = log_pyfunc(d, spec)
    logged = Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "artifacts"
    assert [p.name for p in logged.iterdir()] == ["model_dir"]
    assert not list(logged.glob("model_dir/*.onnx*")) and (logged / "model_dir/model.safetensors").is_file()
    # its own record: every file it holds, and not the ONNX graph it was left without (it would fail to load)
    held = {p.relative_to(logged / "model_dir").as_posix() for p in (logged / "model_dir").rglob("*") if p.is_file()}
    assert set(model_checksums(logged / "model_dir")) == held - {CHECKSUMS} and "model.onnx" in model_checksums(d)
    assert verify_model_dir(logged / "model_dir")
    assert not list(d.parent.glob(".pyfunc*"))
    out = check_loads_alone(info.model_uri, example_input(spec), expected)
    if task == "lm":
        assert list(out) == ["completion"] and out["completion"] == expected["completion"].tolist()
        assert len(out["completion"]) == 2 and all(isinstance(c, str) for c in out["completion"])
    else:
        images = np.asarray(out[""])
        assert images.shape == (2, 64) and abs(images).max() <= 1.0 + 1e-5
        assert np.allclose(images, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("damage", ["module_missing", "undeclared_import", "other_prediction"])
def test_model_that_needs_more_than_it_ships_does_not_load_alone(built_data, tmp_path, mlflow_store, damage):
    """In this process every package is importable and `pipeline` is this checkout's, so a logged model
    whose code/ lacks a module, or whose code imports a package its requirements do not pull in, would
    load here and fail where it is served. Loaded alone, each is one line naming the module; a model
    that predicts otherwise than it did here is named too. (`test_pyfunc_round_trip` is the control:
    the same model, undamaged, loads alone and predicts what it did here.)"""
    import shutil

    d, spec = _model_dir(tmp_path, built_data, "lm")
    write_checksums(d)
    with mlflow.start_run():
        info, expected = log_pyfunc(d, spec)
    folder = tmp_path / "served"
    shutil.copytree(mlflow.artifacts.download_artifacts(info.model_uri), folder)
    code = folder / "code" / "pipeline"
    if damage == "module_missing":
        (code / "models" / "generation.py").unlink()
        message = r"'generation' from 'pipeline\.models'.* \(the model's code/ lacks pipeline\.models\.generation\)$"
    elif damage == "undeclared_import":  # onnx: installed here (the export uses it), not a serving requirement
        module = code / "export" / "pyfunc.py"
        module.write_text(module.read_text().replace("from __future__ import annotations\n",
                                                     "from __future__ import annotations\n\nimport onnx\n", 1))
        message = (r"requirements\.txt: mlflow==.*torch.*: ModuleNotFoundError: No module named 'onnx' \(onnx is "
                   r"installed here, from onnx, but the model's requirements do not need it")
    else:
        predicted, expected = expected, expected.assign(completion=["other", "text"])
        message = r"predicts otherwise when loaded alone: .* against \{\"completion\": \[\"other\", \"text\"\]\}"
    with pytest.raises(LoadAloneError, match=message):
        check_loads_alone(folder, example_input(spec), expected)
    if damage == "other_prediction":  # export.load_alone: false compares too, in this process
        with pytest.raises(LoadAloneError, match=message.replace("when loaded alone", "when loaded back in this "
                                                                 "process")):
            check_loads_here(info.model_uri, example_input(spec), expected)
        assert check_loads_here(info.model_uri, example_input(spec), predicted)["completion"] == \
            list(predicted["completion"])  # (the control: what it did predict)


def _served_diffusion(d: Path) -> PipelineModel:
    """The diffusion model folder `d` loaded as it is served, its weights moved off adaLN-Zero's
    zero output so the sampler's settings and noise show in the samples."""
    write_checksums(d)
    served = PipelineModel()
    served.load(d)
    with torch.no_grad():
        for p in served.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return served


def test_served_diffusion_model_samples_as_evaluation_scored_and_names_bad_requests(built_data, tmp_path):
    """The served model sampled with 25 steps whatever the config, while evaluation (and the
    registry's metric) scored the configured sampler: its defaults are now the evaluated sampler
    (the export folder's sampler.json, from the task's eval section), whose sample_grid images it
    equals; a folder written before sampler.json serves the sampler its spec held. Labels outside
    the classes, an empty request, a step count below 1 or not an integer, a NaN or infinite guidance
    (a NaN sampled as guidance 0), an eta outside [0, 1] or not a number and a seed beyond 64 bits are
    one line each."""
    import json

    import pandas as pd

    from pipeline.config.schema import EvalConfig
    from pipeline.evaluation.diffusion import sample_grid
    from pipeline.export.pyfunc import (
        MAX_ROWS,
        SAMPLER,
        diffusion_params,
        sampler_defaults,
        sampler_settings,
    )

    d, spec = _model_dir(tmp_path, built_data, "diffusion")
    evaluated = EvalConfig(sample_rows=2, sample_cols=2, sample_steps=7, sample_eta=0.5, guidance_scale=2.0)
    (d / SAMPLER).write_text(json.dumps(sampler_settings(evaluated)))  # as the export stage writes it
    served = _served_diffusion(d)
    labels, images = sample_grid(served.model, evaluated, seed=0)
    got = served.predict(None, pd.DataFrame({"label": labels}), {"seed": 0})
    assert np.array_equal(got, images.flatten(1).numpy())
    for changed in ({"steps": 25}, {"eta": 0.0}, {"guidance": 0.0}):
        assert not np.allclose(served.predict(None, pd.DataFrame({"label": labels}), {"seed": 0, **changed}), got)
    (d / SAMPLER).unlink()  # an export from before: the sampler its spec held, else eval's defaults
    old = {**spec, "model": {**spec["model"], "diffusion": {**spec["model"]["diffusion"], "sample_steps": 9}}}
    assert sampler_defaults(d, old) == {"steps": 9, "eta": 1.0, "guidance": 1.0}
    assert sampler_defaults(d, spec) == sampler_settings(EvalConfig())
    classes, timesteps = served.model.num_classes, served.model.cfg.diffusion.timesteps
    for frame, params, message in [
        (pd.DataFrame({"label": [0, classes]}), {}, rf"^label: class ids are integers 0\.\.{classes - 1}"),
        (pd.DataFrame({"label": [-1]}), {}, "^label: class ids are integers"),
        (pd.DataFrame({"label": [0.5]}), {}, "^label: class ids are integers"),
        (pd.DataFrame({"label": pd.Series([], dtype="int64")}), {}, "^label: the request has no rows"),
        (pd.DataFrame({"label": [0]}), {"steps": 0}, rf"^steps: at least 1, at most the model's {timesteps}"),
        (pd.DataFrame({"label": [0]}), {"eta": 2.0}, r"^eta: in \[0, 1\] .*\(got 2\.0\)$"),
        (pd.DataFrame({"label": [0]}), {"eta": "x"}, r"^eta: a number \(got 'x'\)$"),
        (pd.DataFrame({"label": [0]}), {"guidance": float("nan")}, r"^guidance: a finite number, at least 0 .*nan"),
        (pd.DataFrame({"label": [0]}), {"guidance": float("inf")}, r"^guidance: a finite number, at least 0 .*inf"),
        (pd.DataFrame({"label": [0]}), {"guidance": -1.0}, r"^guidance: a finite number, at least 0"),
        (pd.DataFrame({"label": [0]}), {"steps": 2.9}, r"^steps: an integer \(got 2\.9\)$"),
        (pd.DataFrame({"label": [0]}), {"steps": None}, r"^steps: an integer \(got None\)$"),
        (pd.DataFrame({"label": [0]}), {"seed": 2**70}, r"^seed: a 64-bit integer"),
        (pd.DataFrame({"class": [0]}), {}, r"^label: the request has no `label` column \(got columns \['class'\]\)$"),
        (pd.DataFrame({"label": [0] * (MAX_ROWS + 1)}), {}, rf"^label: {MAX_ROWS + 1} labels, at most {MAX_ROWS} a"),
    ]:
        with pytest.raises(ValueError, match=message):
            served.predict(None, frame, params)
    # guidance mixes in an unconditional prediction only label dropout trains: refused without it
    assert diffusion_params({"guidance": 2.0}, sampler_defaults(d, spec), timesteps, 0.1)["guidance"] == 2.0
    with pytest.raises(ValueError, match=r"^guidance: this model was trained without dropping labels"):
        diffusion_params({"guidance": 2.0}, sampler_defaults(d, spec), timesteps, 0.0)
    # a default is what evaluation scored (an export from before the check may hold guidance 1.0): served
    legacy = {"steps": 100, "eta": 0.0, "guidance": 1.0}
    assert diffusion_params({}, legacy, timesteps, 0.0)["guidance"] == 1.0


def test_served_diffusion_image_is_its_label_and_seed_alone(built_data, tmp_path):
    """The starting noise and each step's noise were drawn for the whole request from one
    generator, so a label's image changed with the other labels and its place among them (max
    difference 2.0 in [-1, 1]). Now row i of a request is the image its label alone gets with
    seed + i: the same in any request, across the request's batches of IMAGES_PER_BATCH, and a
    label asked for twice gives two images."""
    import pandas as pd

    from pipeline.export.pyfunc import IMAGES_PER_BATCH

    d, _ = _model_dir(tmp_path, built_data, "diffusion")
    served = _served_diffusion(d)
    labels = [i % served.model.num_classes for i in range(IMAGES_PER_BATCH + 3)]  # two batches
    params = {"seed": 11, "steps": 3, "eta": 1.0}
    together = served.predict(None, pd.DataFrame({"label": labels}), params)
    for row in (0, 1, IMAGES_PER_BATCH + 2):
        alone = served.predict(None, pd.DataFrame({"label": [labels[row]]}), {**params, "seed": 11 + row})
        assert np.allclose(alone[0], together[row], atol=1e-5, rtol=0), row
    twice = served.predict(None, pd.DataFrame({"label": [3, 3]}), params)
    assert not np.allclose(twice[0], twice[1])
    assert np.array_equal(served.predict(None, pd.DataFrame({"label": labels}), params), together)


def test_champion_moves_only_when_better(built_data, tmp_path, mlflow_store):
    d, spec = _model_dir(tmp_path, built_data, "diffusion")
    cfg = RegistryConfig(name="test-model", metric="loss", greater_is_better=False)
    regs = []
    for value in (2.0, 3.0, 1.0):
        with mlflow.start_run() as run:
            info, _ = log_pyfunc(d, spec)
        regs.append(register(info.model_uri, run.info.run_id, cfg, value, {"git_commit": "abc"}))
    assert [r.promoted for r in regs] == [True, False, True]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("test-model", CHAMPION).version) == regs[2].version
    assert str(client.get_model_version_by_alias("test-model", CHALLENGER).version) == regs[2].version
    assert client.get_model_version("test-model", regs[1].version).tags["git_commit"] == "abc"
    champion = mlflow.pyfunc.load_model("models:/test-model@champion")
    assert champion.predict(example_input(spec)).shape == (2, 64)


def test_champion_ranked_by_another_metric_or_direction_is_not_compared(built_data, tmp_path, mlflow_store):
    """A config that now ranks by val_perplexity does not compare 150 with the champion's val_loss 5.2
    (nor "higher is better" with a loss): the champion stays, the registration says how it was
    ranked, and once a version ranked this way is champion the comparison resumes. A champion from
    before versions recorded their direction is compared as before."""
    d, spec = _model_dir(tmp_path, built_data, "diffusion")
    with mlflow.start_run() as run:
        info, _ = log_pyfunc(d, spec)
    by_loss = RegistryConfig(name="ranked", metric="val_loss", greater_is_better=False)
    by_ppl = RegistryConfig(name="ranked", metric="val_perplexity", greater_is_better=False)
    by_acc = RegistryConfig(name="ranked", metric="val_loss", greater_is_better=True)
    first = register(info.model_uri, run.info.run_id, by_loss, 5.2, {})
    assert first.promoted and first.champion_ranked_by is None
    other = register(info.model_uri, run.info.run_id, by_ppl, 150.0, {})
    assert not other.promoted and other.champion_ranked_by == "val_loss, lower is better"
    flipped = register(info.model_uri, run.info.run_id, by_acc, 9.0, {})
    assert not flipped.promoted and flipped.champion_ranked_by == "val_loss, lower is better"
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("ranked", CHAMPION).version) == first.version
    client.set_registered_model_alias("ranked", CHAMPION, other.version)  # `pipeline promote ranked@2`
    better = register(info.model_uri, run.info.run_id, by_ppl, 120.0, {})
    assert better.promoted and better.champion_ranked_by is None and better.previous_metric == 150.0
    client.delete_model_version_tag("ranked", better.version, "greater_is_better")  # a version from before
    older = register(info.model_uri, run.info.run_id, by_ppl, 100.0, {})
    assert older.promoted and older.champion_ranked_by is None


def test_champion_scored_under_another_eval_config_is_not_compared(mlflow_store):
    """A val_loss over 8 rows beat one over 1,280 and took the champion alias; a version scored under
    other eval settings of its metric (`eval.scoring_digest`) is now compared as one ranked by another metric:
    the champion stays until promoted by hand; the same eval config compares as before, and a
    champion from before versions recorded it is compared too."""
    from pipeline.tracking.registry import eval_config_tags

    with mlflow.start_run() as run:
        mlflow.log_text("flavors: {}\n", "model/MLmodel")
    rid, cfg = run.info.run_id, RegistryConfig(name="scored", metric="val_loss")
    many, few = eval_config_tags({"max_batches": 40, "batch_size": 32}), eval_config_tags({"max_batches": 1,
                                                                                              "batch_size": 8})
    first = register(f"runs:/{rid}/model", rid, cfg, 4.0, many)
    assert first.promoted
    other = register(f"runs:/{rid}/model", rid, cfg, 3.9, few)
    assert not other.promoted and other.champion_ranked_by == \
        "val_loss, lower is better under other eval settings (max_batches, batch_size)"
    # settings no metric depends on (the device, the sample grid) do not stop the comparison
    same = register(f"runs:/{rid}/model", rid, cfg, 3.8,
                    eval_config_tags({"max_batches": 40, "batch_size": 32, "device": "cpu", "sample_cols": 10}))
    assert same.promoted and same.previous_champion == first.version
    MlflowClient().delete_model_version_tag("scored", same.version, "eval.scoring_digest")  # from before the tag
    assert register(f"runs:/{rid}/model", rid, cfg, 3.7, few).promoted
    # the registered model's description follows the metric it is ranked by
    register(f"runs:/{rid}/model", rid, RegistryConfig(name="scored", metric="val_perplexity"), 40.0, few)
    assert "`val_perplexity`" in MlflowClient().get_registered_model("scored").description


def test_champion_with_a_loss_of_other_units_is_not_compared(mlflow_store):
    """An eps-prediction diffusion champion and a v-prediction challenger have denoise losses in
    different units (the loss is the MSE of what each predicts): the v model's 0.05 took the alias
    from an eps model's 0.16. A version records what its loss measures (`Task.loss_settings`:
    target, schedule, timesteps); a loss metric is compared only between equal settings, a sample
    metric (the images themselves) across them, and a version from before the tag is compared."""
    import json

    from pipeline.tasks import task_named
    from pipeline.tracking.registry import eval_config_tags, loss_settings_tag

    with mlflow.start_run() as run:
        mlflow.log_text("flavors: {}\n", "model/MLmodel")
    rid, uri = run.info.run_id, f"runs:/{run.info.run_id}/model"
    task = task_named("diffusion")

    def tags(prediction: str) -> dict[str, str]:
        spec = {"model": {"kind": "dit", "diffusion": {"prediction": prediction, "timesteps": 1000}}}
        return {**eval_config_tags({"max_batches": 4, "batch_size": 8, "samples_per_class": 2}),
                **loss_settings_tag(task.loss_settings(spec))}

    assert json.loads(tags("v")["eval.loss_settings"]) == {"prediction": "v", "schedule": "cosine",
                                                           "timesteps": 1000}
    assert task_named("lm").loss_settings({"model": {}}) == {} and loss_settings_tag({}) == {}
    by_loss = RegistryConfig(name="units", metric="val_denoise_loss")
    assert register(uri, rid, by_loss, 0.16, tags("eps")).promoted
    v = register(uri, rid, by_loss, 0.05, tags("v"))
    assert not v.promoted and v.champion_ranked_by == (
        'val_denoise_loss, lower is better of a model with other loss settings '
        '({"prediction":"eps","schedule":"cosine","timesteps":1000})')
    assert register(uri, rid, by_loss, 0.15, tags("eps")).promoted  # the same settings compare as before
    samples = RegistryConfig(name="units-samples", metric="sample_accuracy", greater_is_better=True)
    assert register(uri, rid, samples, 0.8, tags("eps")).promoted
    assert register(uri, rid, samples, 0.9, tags("v")).promoted  # samples are samples, whatever the target
    old = register(uri, rid, by_loss, 0.14, tags("eps"))
    MlflowClient().delete_model_version_tag("units", old.version, "eval.loss_settings")  # from before the tag
    assert register(uri, rid, by_loss, 0.04, tags("v")).promoted


def test_reproduce_compares_with_the_evaluation_a_version_was_registered_on(mlflow_store):
    """One run evaluated twice (another eval config) is two versions; the run keeps only its latest
    eval/* metrics, so `pipeline reproduce m@1` compared v1's re-run with v2's numbers. The register
    stage now tags each version with its evaluation, and reproduce compares with that; a version
    registered before the tags falls back to the run's metrics."""
    from pipeline.flows.reproduce import plan

    with mlflow.start_run() as run:
        mlflow.set_tags({"git.commit": "a" * 40, "task": "lm"})
        mlflow.log_text("flavors: {}\n", "model/MLmodel")
    rid, cfg, client = run.info.run_id, RegistryConfig(name="m", metric="val_loss"), MlflowClient()
    client.log_metric(rid, "eval/val_loss", 5.0)
    register(f"runs:/{rid}/model", rid, cfg, 5.0, {"eval/val_loss": "5.0", "eval/val_perplexity": "148.4"})
    client.log_metric(rid, "eval/val_loss", 4.0)  # evaluated anew
    register(f"runs:/{rid}/model", rid, cfg, 4.0, {"eval/val_loss": "4.0", "eval/val_perplexity": "54.6"})
    assert plan("m@1")["metrics"] == {"val_loss": 5.0, "val_perplexity": 148.4}
    assert plan("m@2")["metrics"] == {"val_loss": 4.0, "val_perplexity": 54.6}
    register(f"runs:/{rid}/model", rid, cfg, 3.0, {})  # a version from before the tags
    assert plan("m@3")["metrics"] == {"val_loss": 4.0}


def test_unet_exports_to_onnx(tmp_path):
    from pipeline.config.schema import UNetConfig

    spec = {"task": "diffusion", "model": UNetConfig(base_channels=8).model_dump(mode="json"),
            "image_shape": [1, 8, 8], "num_classes": 10}
    model = task_for_spec(spec).build(spec)
    with torch.no_grad():  # move off the zero-initialised output so the comparison means something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert export_onnx(model.eval(), spec, tmp_path / "unet.onnx") < 1e-4


def test_served_model_ends_at_the_manifests_end_of_document_token(built_data, tmp_path):
    """The served LM stops at the end-of-document token the shards were written with, which the
    export stage records in generation.json (a Llama-3 tokenizer's is neither of the names the
    pyfunc knew); an export from before the record finds ours by name."""
    import json

    from tokenizers import Tokenizer

    from pipeline.export.pyfunc import GENERATION, end_of_document

    tokenizer = Tokenizer.from_file(str(built_data[1]["lm"] / "tokenizer.json"))
    assert end_of_document(tmp_path, tokenizer) == tokenizer.token_to_id("<|endoftext|>") is not None
    (tmp_path / GENERATION).write_text(json.dumps({"eos_token": tokenizer.id_to_token(5)}))
    assert end_of_document(tmp_path, tokenizer) == 5


def test_export_stage_reports_a_skipped_onnx_graph_without_crashing(monkeypatch, capsys):
    """With `export.onnx` false the flow returns no ONNX difference; the stage's summary, printed
    after the export is committed and logged, formatted it as a float and failed the stage."""
    import stages.export as stage
    from pipeline.config import validate
    from tests.conftest import tiny_raw

    cfg = validate(tiny_raw(["tasks.diffusion.export.onnx=false"]))
    assert cfg.task("diffusion").export.onnx is False
    monkeypatch.setattr(stage, "export", lambda *a, **k: {"model_uri": "models:/m/1", "run_id": "r",
                                                          "onnx_max_abs_diff": None, "hf_skipped": "not an LM"})
    stage.run(cfg, "diffusion")
    out = capsys.readouterr().out
    assert "ONNX skipped (export.onnx false); MLflow model models:/m/1" in out
    assert "no transformers folder: not an LM" in out
