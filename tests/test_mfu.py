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
