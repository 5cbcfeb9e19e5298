"""Damaged model files and the inputs a stage trusts (issue 21): a truncated or bit-flipped model
folder is named by `load_model`, blown-up weights give an infinite perplexity, the weights a run
starts from are checked on the driver before any run exists, and the register stage's JSON inputs
are named with the stage to run again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import CHECKSUMS, WEIGHTS, DamagedFile, load_model, write_model
from tests.damage import flip, truncate


def _lm_model_dir(built_data, tmp_path) -> Path:
    from pipeline.data.shard_format import load_manifest
    from pipeline.tasks import task_named

    cfg, shards = built_data
    task = task_named("lm")
    spec = task.model_spec(cfg.task("lm"), load_manifest(shards["lm"]))
    torch.manual_seed(0)
    model = task.build(spec)
    d = tmp_path / "models" / "lm"
    write_model(d, {k: v.clone() for k, v in model.state_dict().items()}, spec)
    return d


@pytest.mark.parametrize("damage", ["truncated", "flipped", "truncated-no-checksums"])
def test_damaged_model_file_is_named_by_load_model(built_data, tmp_path, damage):
    d = _lm_model_dir(built_data, tmp_path)
    load_model(d)
    if damage.endswith("no-checksums"):  # deleted: nothing to verify against, so nothing is trusted
        (d / CHECKSUMS).unlink()
    (truncate if damage.startswith("truncated") else flip)(d / WEIGHTS)
    with pytest.raises(DamagedFile) as err:
        load_model(d)
    message = str(err.value)
    named = d / (CHECKSUMS if damage.endswith("no-checksums") else WEIGHTS)
    assert "\n" not in message and message.startswith(f"{named} is damaged")
    if damage == "flipped":
        assert "sha256 differs" in message
    if damage.endswith("no-checksums"):
        assert "missing; the folder cannot be verified" in message


def test_damaged_weights_give_an_infinite_perplexity_not_a_crash(built_data):
    """Weights blown up (as flipped exponent bits do) make the loss too large for exp()."""
    from pipeline.config.schema import EvalConfig
    from pipeline.evaluation.lm import evaluate_lm, perplexity

    _, shards = built_data
    assert perplexity(1e6) == float("inf") and perplexity(0.0) == 1.0

    class Huge(torch.nn.Module):
        def forward(self, tokens):
            logits = torch.zeros(*tokens.shape, 300)
            logits[..., 0] = 1e6  # certain of token 0: every other token costs about 1e6
            return logits

        def generate(self, ids, n, **kwargs):
            return torch.cat([ids, torch.zeros(1, n, dtype=ids.dtype)], dim=1)

    metrics, _ = evaluate_lm(Huge(), shards["lm"], EvalConfig(batch_size=4, max_batches=1))
    assert metrics["val_perplexity"] == float("inf") and metrics["val_loss"] > 1e3


def test_damaged_init_weights_are_named_before_any_run(tmp_path, built_data):
    """`trainer.init_from` / `model.init_from` are checked by the train stage's driver before Ray,
    MLflow or a run folder exist: a model folder against its checksums (a bit flip that keeps
    the header readable trained silently before), a truncated safetensors file by its header,
    a Hugging Face index that is not JSON or lists a missing file. One named error, no retries."""
    from safetensors.torch import save_file

    from pipeline.config import validate
    from pipeline.flows.train import train_task
    from pipeline.training.init_weights import check_init_weights
    from tests.conftest import tiny_raw

    folder = tmp_path / "model"
    write_model(folder, {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, {"kind": "test"})
    check_init_weights(folder, "k")  # intact
    flip(folder / WEIGHTS, 200)
    with pytest.raises(DamagedFile, match=rf"{folder / WEIGHTS} is damaged \(its sha256 differs"):
        check_init_weights(folder, "k")
    single = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(single))
    truncate(single)
    with pytest.raises(DamagedFile, match=rf"{single} .*not a readable safetensors file"):
        check_init_weights(single, "k")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors.index.json").write_text('{"weight_map": {"a": "part-1.safetensors",')
    with pytest.raises(DamagedFile, match=r"model.safetensors.index.json .*not a safetensors index"):
        check_init_weights(hf, "k")
    (hf / "model.safetensors.index.json").write_text('{"weight_map": {"a": "part-1.safetensors"}}')
    with pytest.raises(FileNotFoundError, match=r"^k: .*part-1.safetensors is missing \(listed in model.safetensors"):
        check_init_weights(hf, "k")
    with pytest.raises(FileNotFoundError, match=r"^k: .*nowhere does not exist"):
        check_init_weights(tmp_path / "nowhere", "k")

    _, shards = built_data
    store = tmp_path / "store"
    cfg = validate(tiny_raw([f"tasks.lm.trainer.init_from={folder}", f"cluster.storage_path={store}",
                             f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"]))
    with pytest.raises(DamagedFile, match=rf"{folder / WEIGHTS} is damaged"):
        train_task(cfg, "lm", shards["lm"], tmp_path / "out", tmp_path / "metrics")
    assert not store.exists() and not (tmp_path / "mlruns.db").exists() and not (tmp_path / "out").exists()


def test_damaged_register_inputs_are_named(tmp_path):
    """The register stage reads the export's model_info.json and the evaluation's eval.json: a
    truncated one is named with the stage to run again, not a bare JSON error."""
    from pipeline.config import validate
    from pipeline.flows.export import INFO, register_export
    from tests.conftest import tiny_raw

    cfg = validate(tiny_raw())
    export_dir, metrics_dir = tmp_path / "export", tmp_path / "metrics"
    export_dir.mkdir()
    metrics_dir.mkdir()
    (export_dir / INFO).write_text('{"run_id": "ab')
    (metrics_dir / "eval.json").write_text('{"val_loss": 1.0}')
    with pytest.raises(DamagedFile, match=rf"^{export_dir / INFO} is damaged \(not valid JSON: .*run the export stage"):
        register_export(cfg, "lm", export_dir, metrics_dir, tmp_path / "out")
    (export_dir / INFO).write_text('{"run_id": "ab"}')
    (metrics_dir / "eval.json").write_text('{"val_lo')
    with pytest.raises(DamagedFile, match=r"eval.json is damaged \(not valid JSON: .*run the evaluate stage again"):
        register_export(cfg, "lm", export_dir, metrics_dir, tmp_path / "out")
    (metrics_dir / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"eval.json is missing: run the evaluate stage first"):
        register_export(cfg, "lm", export_dir, metrics_dir, tmp_path / "out")
    from pipeline.tracking.mlflow_runs import RUN_FILE, read_run_file  # the run the train stage recorded

    (export_dir / RUN_FILE).write_text('{"run_id": "ab')
    with pytest.raises(DamagedFile, match=rf"^{export_dir / RUN_FILE} is damaged \(not valid JSON: .*run the train"):
        read_run_file(export_dir)
    for record in ("[]", '{"run_id": "ab"}'):  # not the record the train stage writes
        (export_dir / RUN_FILE).write_text(record)
        with pytest.raises(DamagedFile, match=rf"^{export_dir / RUN_FILE} is damaged \(no '(run_id|tracking_uri)' "
                                              r"string in it; run the train stage again\)"):
            read_run_file(export_dir)
    (export_dir / RUN_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{export_dir / RUN_FILE} is missing: run the train stage first"):
        read_run_file(export_dir)
