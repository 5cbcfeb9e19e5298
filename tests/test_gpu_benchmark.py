"""`benchmarks/gpu.py` on the CPU, so that the script a GPU lease runs (minutes, rarely lent) has
not broken in between: its smoke mode end to end, and how a row that runs out of memory is lowered
and noted against the planner."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.conftest import ROOT


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    ran = [r for r in rows if r["tokens_per_s"]]
    assert ran and all(r["micro_batch"] >= 1 and r["mfu"] > 0 for r in ran)
    assert all("not run" in r["note"] for r in rows if r["precision"] == "fp8")  # fp8 needs a GPU


def test_gpu_benchmark_lowers_an_oom_row_and_notes_it_against_the_plan(monkeypatch):
    """A micro-batch that runs out of memory is lowered by a fifth until one runs; each failure
    stays in the row's note with the failed request and the planner's peak at that micro-batch."""
    sys.path.insert(0, str(ROOT))
    import benchmarks.gpu as gpu

    tried = []

    def run(preset, seq, precision, ac, compile_mode, micro, *args, **kwargs):  # the GPU step stands aside
        tried.append(micro)
        if micro > 3:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.50 GiB (micro-batch {micro})")
        return {"params": 3e6, "tokens_per_s": 1000.0, "step_ms": 10.0, "mfu": 0.1, "peak_bytes": None,
                "fp8_layers": 0, "optimizer": "torch AdamW"}

    monkeypatch.setattr(gpu, "run", run)
    row = gpu.measure(gpu.Row("gpt_small", "none", "fp32", "none"), 2048, 1, 0, torch.device("cpu"), None, None,
                      fixed_micro=5)
    assert tried == [5, 4, 3] and row.micro_batch == 3
    ooms = [n for n in row.note.split("; ") if n.startswith("OOM")]
    assert [o.split(":")[0] for o in ooms] == ["OOM at micro-batch 5", "OOM at micro-batch 4"]
    assert all("asked 1.50 GiB" in o and "planned n/a" not in o for o in ooms)
    planned = [float(o.rsplit("planned ", 1)[1].split()[0]) for o in ooms]
    assert planned[0] > planned[1] > 0  # the plan at each failed micro-batch, larger for the larger one
