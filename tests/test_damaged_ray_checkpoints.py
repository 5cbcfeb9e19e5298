"""Damaged Ray Train checkpoints (issue 21): before a fit, the driver sets a damaged newest
checkpoint aside (renamed `.damaged`, dropped from the controller's snapshot), removes folders a
crash left unfinished, and the run resumes from the newest intact one with the weights an
uninterrupted run ends with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import STATE, CheckpointError, read_meta, seal_checkpoint
from pipeline.training.session import LocalSession
from tests.conftest import ROOT
from tests.damage import flip, truncate


def _sealed(directory: Path, step: int, ranks: int = 2) -> Path:
    directory.mkdir(parents=True)
    (directory / STATE).write_bytes(os.urandom(4096))
    for rank in range(ranks - 1, -1, -1):
        seal_checkpoint(directory, rank, ranks, {"step": step} if rank == 0 else None)
    return directory


def _ray_run(run_dir: Path, steps: list[int]) -> list[str]:
    """A Ray Train run folder as the controller leaves it: checkpoints and its snapshot."""
    names = [f"checkpoint_2026-01-01_00-00-{i:02d}.000000" for i in range(len(steps))]
    for name, step in zip(names, steps, strict=True):
        _sealed(run_dir / name, step)
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"step": s}} for n, s in zip(names, steps,
                                                                                                   strict=True)]
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": results,
        "checkpoint_report_indices": list(range(1, len(steps) + 1)), "latest_checkpoint_result": results[-1],
        "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(steps),
        "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": []}))
    return names


@pytest.mark.parametrize("layout", ["ray", "horovod"])
def test_damaged_checkpoint_is_set_aside_by_the_driver(tmp_path, capsys, layout):
    """`recover`, before a fit: the newest checkpoint is damaged, so it is renamed *.damaged and
    (Ray) dropped from the controller's list, whose latest entry becomes the newest intact one;
    unfinished folders (never registered, or staging) are removed; one line says it all."""
    from pipeline.config import validate
    from pipeline.runtime.recovery import SNAPSHOT, recover
    from tests.conftest import tiny_raw

    strategy = ["strategy.name=horovod", "strategy.backend=gloo"] if layout == "horovod" else []
    cfg = validate(tiny_raw([f"cluster.storage_path={tmp_path}", *strategy]))
    run_dir = tmp_path / "run"
    if layout == "ray":
        names = _ray_run(run_dir, [10, 20, 30])
        shutil.rmtree(run_dir / names[0])  # an older one deleted by hand: Ray would refuse the whole list
        (run_dir / "checkpoint_2026-01-01_00-00-59.000000").mkdir()  # a copy a crash cut short
    else:
        names = [_sealed(run_dir / f"checkpoint_{s:08d}", s, 1).name for s in (10, 20, 30)]
        (run_dir / "checkpoint_00000040.tmp").mkdir()
    flip(run_dir / names[2] / STATE, 10)
    found = recover(cfg, "lm", "run")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + (layout == "ray") and "removed 1 unfinished checkpoint folder(s)" in out[0], out
    assert out[1].startswith(f"[lm] checkpoint file {run_dir / names[2] / STATE} is damaged (its sha256 differs")
    assert "resuming from the newest intact checkpoint, step 20" in out[1]
    assert found.resumed_step == 20 and found.verified == names[1] and found.set_aside == [names[2] + ".damaged"]
    assert found.tags() == {"checkpoint.damaged": str(run_dir / names[2] / STATE), "checkpoint.damaged_count": "1",
                            "checkpoint.resumed_from_step": "20"}
    expected = sorted([*names[0 if layout != "ray" else 1:2], names[2] + ".damaged"])
    assert sorted(p.name for p in run_dir.iterdir() if p.name != SNAPSHOT) == expected
    if layout == "ray":
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
        assert [e["checkpoint_dir_name"] for e in snapshot["checkpoint_results"]] == [names[1]]
        assert snapshot["checkpoint_report_indices"] == [2]
        assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == names[1]
        assert out[2].startswith("[lm] dropped 1 missing checkpoint folder(s)") and names[0] in out[2]
    else:
        with LocalSession(run_dir).latest_checkpoint() as latest:
            assert latest == run_dir / names[1]
    assert recover(cfg, "lm", "run").resumed_step == 20 and capsys.readouterr().out == ""  # nothing more to do

    for name in names[:2]:  # now none is intact: one line, nothing changed
        if (run_dir / name).is_dir():
            truncate(run_dir / name / STATE)
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(CheckpointError, match="no intact checkpoint is left") as err:
        recover(cfg, "lm", "run")
    assert "\n" not in str(err.value) and sorted(p.name for p in run_dir.iterdir()) == before


# --- through Ray Train: the driver sets a damaged checkpoint aside before the fit ---------------

@pytest.mark.e2e
def test_damaged_latest_ray_checkpoint_resumes_from_the_previous_one(built_data, tmp_path):
    """The train flow on Ray Train (2 workers), twice in one process: an uninterrupted run
    (checkpoints at steps 3 and 6), then the same run again after its step-6 `state.pt` was
    truncated and a half-written, never registered checkpoint folder appeared beside it. The
    rerun removes the unfinished folder, names the damaged file in one line, sets that
    checkpoint aside, resumes from step 3, tags the MLflow run, and ends with exactly the
    weights of the uninterrupted run."""
    _, shards = built_data
    project = tmp_path / "project"
    shutil.copytree(shards["lm"], project / "data" / "lm" / "shards")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.test_damaged_ray_checkpoints", str(project)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    report = json.loads((project / "report.json").read_text())
    damaged = [line for line in out.splitlines() if " is damaged " in line]
    assert len(damaged) == 1, out[-6000:]
    assert damaged[0].startswith(f"[lm] checkpoint file {report['damaged_file']} is damaged (") and \
        "resuming from the newest intact checkpoint, step 3" in damaged[0], damaged[0]
    assert any("removed 1 unfinished checkpoint folder(s)" in line and "checkpoint_2000-01-01" in line
               for line in out.splitlines()), out[-6000:]
    assert any("resumed from step 3" in line for line in out.splitlines()), out[-6000:]
    assert "Error in training function" not in out  # no worker failed, nothing retried
    assert report["steps"] == [6, 6] and report["equal"], report
    assert report["left"] == sorted(report["left"]) and any(n.endswith(".damaged") for n in report["left"])
    assert not any(n.startswith("checkpoint_2000") for n in report["left"])
    assert report["tags"]["checkpoint.damaged"] == report["damaged_file"]
    assert report["tags"]["checkpoint.resumed_from_step"] == "3"


def _ray_rerun(project: Path) -> None:
    import mlflow
    from safetensors.torch import load_file

    from pipeline.config import validate
    from pipeline.flows.train import train_task
    from pipeline.runtime.recovery import SNAPSHOT
    from tests.conftest import tiny_raw

    os.chdir(project)
    cfg = validate(tiny_raw())
    args = (cfg, "lm", Path("data/lm/shards"), Path("models/lm"), Path("metrics/lm"))
    first = train_task(*args)
    whole = load_file("models/lm/model.safetensors")
    run_dir = project / "runs" / "ray" / first.run_name
    snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    latest = run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert read_meta(latest)["step"] == 6
    truncate(latest / STATE)
    unfinished = run_dir / "checkpoint_2000-01-01_00-00-00.000000"  # a copy a crash cut short
    unfinished.mkdir()
    (unfinished / STATE).write_bytes(b"\0" * 100)
    second = train_task(*args)
    again = load_file("models/lm/model.safetensors")
    tags = mlflow.MlflowClient().get_run(second.run_id).data.tags
    (project / "report.json").write_text(json.dumps({
        "steps": [first.steps, second.steps], "damaged_file": str(latest / STATE),
        "equal": whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole),
        "left": sorted(os.listdir(run_dir)), "tags": {k: v for k, v in tags.items() if k.startswith("checkpoint.")}}))

if __name__ == "__main__":
    _ray_rerun(Path(sys.argv[1]))
