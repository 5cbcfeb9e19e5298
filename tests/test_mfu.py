"""Live MFU: the dense peak a run is measured against (table, config, measured CPU GEMM) and
the `mfu` every history entry carries next to its throughput."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import validate
from pipeline.training.mfu import Peak, device_peak, measured_cpu_tflops, mfu, precision_key, table_peak
from tests.conftest import tiny_raw


@pytest.mark.parametrize(("name", "key", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # SXM
    ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA GH200 480GB", "bf16", 989.4),
    ("NVIDIA A100-SXM4-40GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
    ("NVIDIA A10G", "bf16", 125.0),
    ("NVIDIA L4", "fp8", 242.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA A100-SXM4-80GB", "fp8", None),  # Ampere has no float8
    ("Some Future GPU", "bf16", None),
])
def test_mfu_peak_table_lookup(name, key, tflops):
    assert table_peak(name, key) == tflops


def test_mfu_peak_override_and_precision_column(monkeypatch):
    assert device_peak(torch.device("cpu"), "bf16", override=123.0) == Peak(123.0, "trainer.peak_tflops")
    cuda = torch.device("cuda", 0)  # only its type is looked at
    assert precision_key("bf16", cuda) == "bf16"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 matmuls allowed
    assert precision_key("fp32", cuda) == "tf32"
    assert precision_key("fp32", torch.device("cpu")) == "fp32"
    assert mfu(50.0, Peak(100.0, "x"), devices=2) == 0.25


def test_mfu_cpu_peak_is_measured_once(monkeypatch):
    first = measured_cpu_tflops(torch.float32)
    assert first > 0

    def no_more_gemms(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(torch, "mm", no_more_gemms)
    assert measured_cpu_tflops(torch.float32) == first  # cached per dtype and thread count
    peak = device_peak(torch.device("cpu"), "fp32")
    assert peak.tflops == first and "measured" in peak.source


@pytest.mark.parametrize("task", ["lm", "diffusion"])
def test_mfu_in_every_history_entry_of_a_tiny_cpu_run(built_data, tmp_path, task):
    from pipeline.training.checkpoint import read_meta
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    _, shards = built_data
    k = f"tasks.{task}.trainer"
    cfg = validate(tiny_raw([f"{k}.max_steps=2", f"{k}.log_every=1", f"{k}.ckpt_every=2"]))
    session = LocalSession(tmp_path)
    state = train(cfg, task, shards[task], session)
    assert len(state.history) == 2
    for entry in state.history:
        assert 0 < entry["mfu"] <= 1, entry
        assert entry["model_tflops"] > 0
    assert [r["mfu"] for r in session.reports] == [h["mfu"] for h in state.history]  # what goes to MLflow
    with session.latest_checkpoint() as ckpt:
        implementation = read_meta(ckpt)["implementation"]
    assert "measured" in implementation["mfu_peak"] and float(implementation["mfu_peak_tflops"]) > 0


def test_mfu_cpu_peak_measured_again_when_the_model_beats_it(monkeypatch, built_data, tmp_path, capsys):
    """A CPU peak measured while the machine was busy (here: pretended 1,000x too low) is measured
    again when the model outruns it: MFU stays a fraction, the log says so, and the checkpoint
    records the peak used. A known (table or configured) peak is never replaced."""
    from pipeline.training import mfu as mfu_module
    from pipeline.training.checkpoint import read_meta
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    true_peak = measured_cpu_tflops(torch.float32)
    monkeypatch.setitem(mfu_module._measured, (torch.float32, torch.get_num_threads()), true_peak / 1000)
    busy = device_peak(torch.device("cpu"), "fp32")
    assert busy.tflops == pytest.approx(true_peak / 1000)
    assert Peak(1.0, "the table").beaten_by(5.0).tflops == 1.0
    assert busy.beaten_by(busy.tflops / 2) is busy  # not beaten: not measured again

    _, shards = built_data
    cfg = validate(tiny_raw(["tasks.lm.trainer.max_steps=2", "tasks.lm.trainer.log_every=1"]))
    session = LocalSession(tmp_path)
    state = train(cfg, "lm", shards["lm"], session)
    assert all(0 < entry["mfu"] <= 1 for entry in state.history), state.history
    assert "MFU peak measured again" in capsys.readouterr().out
    with session.latest_checkpoint() as ckpt:
        implementation = read_meta(ckpt)["implementation"]
    assert float(implementation["mfu_peak_tflops"]) > busy.tflops and "measured again" in implementation["mfu_peak"]
