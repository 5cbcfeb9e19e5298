"""Damaged state (issue 21): a truncated or bit-flipped checkpoint or model file, a full disk, and
the half-written checkpoint folders a crash leaves behind. Each file a checkpoint or model holds
has its size and sha256 recorded when it is written; a damaged one is named in one line, a
resume passes over it to the newest intact checkpoint, and nothing is retried for it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import (
    CHECKSUMS,
    META,
    STATE,
    WEIGHTS,
    CheckpointError,
    DamagedFile,
    load_model,
    load_training_state,
    read_meta,
    seal_checkpoint,
    verify_checkpoint,
    write_model,
)
from pipeline.training.loop import train
from pipeline.training.session import LocalSession
from tests.conftest import ROOT


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path, count: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _state(root: Path) -> dict[str, torch.Tensor]:
    state, _ = load_training_state(sorted(root.glob("checkpoint_*"))[-1])
    return state["model"]


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
def test_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(built_data, tmp_path, capsys, damage):
    """Checkpoints at steps 3 and 6; step 6's state.pt damaged. The rerun names the file in one
    line, resumes from step 3 and ends with exactly the weights of the uninterrupted run."""
    cfg, shards = built_data
    straight = train(cfg, "lm", shards["lm"], LocalSession(tmp_path / "a"))
    assert straight.step == 6
    run = tmp_path / "b"
    shutil.copytree(tmp_path / "a", run)
    damage(run / "checkpoint_00000006" / STATE)
    with pytest.raises(DamagedFile, match=r"checkpoint_00000006/state\.pt is damaged"):
        verify_checkpoint(run / "checkpoint_00000006")
    capsys.readouterr()

    resumed = train(cfg, "lm", shards["lm"], LocalSession(run))
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if "is damaged" in line]
    assert len(said) == 1, out
    assert f"{run / 'checkpoint_00000006' / STATE} is damaged" in said[0]
    assert "resuming from the newest intact checkpoint, step 3" in said[0]
    assert any("resumed from step 3" in line for line in out)
    assert resumed.step == 6 and [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    ref, got = _state(tmp_path / "a"), _state(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    verify_checkpoint(run / "checkpoint_00000006")  # rewritten whole


def test_damaged_later_checkpoints_are_set_aside_once_the_resumed_run_writes_its_own(tmp_path, capsys):
    """Steps 100 (intact), 200 and 300 (damaged), keep_last_k=2: the run resumes from 100 and writes
    150. Pruning kept the two highest steps, the damaged ones, and deleted 150 and 100, so the next
    resume found nothing intact. Later steps are now set aside (`.damaged`, kept to look into)."""
    root = tmp_path / "run"

    def checkpoint(folder: Path, step: int) -> Path:
        folder.mkdir(parents=True)
        (folder / STATE).write_bytes(os.urandom(1000))
        seal_checkpoint(folder, 0, 1, {"step": step})
        return folder

    for step in (100, 200, 300):
        checkpoint(root / f"checkpoint_{step:08d}", step)
    for step in (200, 300):
        _truncate(root / f"checkpoint_{step:08d}" / STATE)
    session = LocalSession(root, keep_last_k=2)
    with session.latest_checkpoint() as latest:
        assert latest.name == "checkpoint_00000100"
    session.report({"step": 150}, checkpoint(tmp_path / "written", 150))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000100", "checkpoint_00000150",
                                                      "checkpoint_00000200.damaged", "checkpoint_00000300.damaged"]
    capsys.readouterr()
    with LocalSession(root).latest_checkpoint() as latest:
        assert latest.name == "checkpoint_00000150"
    assert "is damaged" not in capsys.readouterr().out


def test_damaged_checkpoints_with_none_intact_stop_in_one_line(tmp_path):
    root = tmp_path / "run"
    for step in (3, 6):
        d = root / f"checkpoint_{step:08d}"
        d.mkdir(parents=True)
        (d / STATE).write_bytes(os.urandom(4096))
        seal_checkpoint(d, 0, 1, {"step": step})
        _truncate(d / STATE)
    with pytest.raises(CheckpointError) as err, LocalSession(root).latest_checkpoint():
        pass
    message = str(err.value)
    assert "\n" not in message and "no intact checkpoint is left" in message
    assert f"{root / 'checkpoint_00000006' / STATE} is damaged (2,048 bytes, 4,096 recorded)" in message


def test_damaged_checkpoint_records_are_caught(tmp_path):
    """A rank's record missing or edited, meta.json edited (still valid JSON): each is named."""
    d = tmp_path / "ck"
    d.mkdir()
    (d / STATE).write_bytes(b"x" * 100)
    seal_checkpoint(d, 1, 2)  # rank 1's part
    seal_checkpoint(d, 0, 2, {"step": 5})
    verify_checkpoint(d)
    meta = json.loads((d / META).read_text())
    (d / META).write_text(json.dumps({**meta, "step": 6}))
    with pytest.raises(DamagedFile, match=r"meta\.json is damaged"):
        read_meta(d)
    (d / META).write_text(json.dumps(meta))
    (d / "files-rank1.json").unlink()
    with pytest.raises(DamagedFile, match=r"files-rank1.json is damaged \(missing\)"):
        verify_checkpoint(d)


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
    _flip(run_dir / names[2] / STATE, 10)
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
            _truncate(run_dir / name / STATE)
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(CheckpointError, match="no intact checkpoint is left") as err:
        recover(cfg, "lm", "run")
    assert "\n" not in str(err.value) and sorted(p.name for p in run_dir.iterdir()) == before


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
    (_truncate if damage.startswith("truncated") else _flip)(d / WEIGHTS)
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


# --- a full disk: a real small file system (tmpfs in a private mount namespace) ----------------

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def test_damaged_by_a_full_disk_is_one_line_and_leaves_no_half_written_checkpoint(built_data, tmp_path):
    """Checkpoints at steps 2, 4 and 6 go to a tmpfs sized for the first two but not the final
    one (which adds the export weights). One line names the place and the bytes; no staging
    folder is left behind. Then, with the space freed (remounted larger), the rerun resumes from
    step 4 and ends with the weights of an uninterrupted run. Also the local directory each rank
    saves into first (TMPDIR) on a full file system: torch's writer says no errno there, the
    free space does."""
    if not _can_mount_tmpfs():
        pytest.skip("no unprivileged tmpfs mount here (unshare --user --mount)")
    cfg, shards = built_data
    raw = cfg.model_dump(mode="json")
    raw["tasks"]["lm"]["trainer"]["ckpt_every"] = 2
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-m",
                           "tests.test_damaged_state", "full-disk", str(tmp_path), str(shards["lm"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    full = report["storage"]
    assert full["type"] == "StorageFull" and "\n" not in full["message"], full
    assert full["message"].startswith(f"no space left on device writing the step-6 checkpoint to {tmp_path}/small/run: "
                                      f"this rank's part needs {report['final_part']:,} bytes, "), full["message"]
    assert full["left"] == ["checkpoint_00000002", "checkpoint_00000004"]  # no checkpoint_00000006.tmp
    assert report["resumed"] == {"step": 6, "from": 4, "equal": True,
                                 "left": ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"]}
    local = report["local"]
    assert local["type"] == "StorageFull" and "\n" not in local["message"], local
    assert local["message"].startswith(f"no space left on device writing the step-2 checkpoint to {tmp_path}/small/tmp:"
                                       " this rank's part needs more than "), local["message"]


def _full_disk(base: Path, shards: Path) -> None:
    """Inside a private mount namespace, as its root: tmpfs mounts of chosen sizes."""
    import contextlib
    import io
    import tempfile

    from pipeline.config import validate

    def pages(directory: Path) -> int:  # what a folder takes on tmpfs
        return sum(-(-p.stat().st_size // 4096) * 4096 for p in directory.rglob("*") if p.is_file())

    def mount(where: Path, size: int, *options: str) -> None:
        where.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs", str(where)],
                       check=True)

    cfg = validate(json.loads((base / "cfg.json").read_text()))
    report = {}
    train(cfg, "lm", shards, LocalSession(base / "ref"))  # uninterrupted, on the ordinary disk
    first, final = pages(base / "ref" / "checkpoint_00000002"), pages(base / "ref" / "checkpoint_00000006")
    report["final_part"] = sum(p.stat().st_size for p in (base / "ref" / "checkpoint_00000006").rglob("*")
                               if p.is_file() and not p.name.startswith(("meta", "files-")))
    mnt = base / "small"
    mount(mnt, 2 * first + (final - first) // 2)  # two checkpoints fit, the final one does not

    mount(mnt / "tmp", first // 3)  # first the local directory each rank saves into is too small
    tempfile.tempdir = str(mnt / "tmp")
    try:
        train(cfg, "lm", shards, LocalSession(mnt / "other"))
    except CheckpointError as e:
        report["local"] = {"type": type(e).__name__, "message": str(e)}
    finally:
        tempfile.tempdir = None
    subprocess.run(["umount", str(mnt / "tmp")], check=True)

    root = mnt / "run"
    try:
        train(cfg, "lm", shards, LocalSession(root))
    except CheckpointError as e:
        report["storage"] = {"type": type(e).__name__, "message": str(e), "left": sorted(os.listdir(root))}
    subprocess.run(["mount", "-o", f"remount,size={4 * final}", str(mnt)], check=True)  # space freed
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        state = train(cfg, "lm", shards, LocalSession(root))
    resumed_from = [int(line.split("resumed from step ")[1].split()[0]) for line in log.getvalue().splitlines()
                    if "resumed from step" in line]
    ref, got = _state(base / "ref"), _state(root)
    report["resumed"] = {"step": state.step, "from": resumed_from[0] if resumed_from else None,
                         "equal": all(torch.equal(ref[k], got[k]) for k in ref), "left": sorted(os.listdir(root))}
    (base / "report.json").write_text(json.dumps(report))


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
    proc = subprocess.run([sys.executable, "-m", "tests.test_damaged_state", "ray", str(project)], cwd=ROOT, env=env,
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
    _truncate(latest / STATE)
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
    if sys.argv[1] == "full-disk":
        _full_disk(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "ray":
        _ray_rerun(Path(sys.argv[2]))


def test_damaged_init_weights_are_named_before_any_run(tmp_path, built_data):
    """`trainer.init_from` / `model.init_from` are checked by the train stage's driver before Ray,
    MLflow or a run folder exist: a model folder against its checksums (a bit flip that keeps
    the header readable trained silently before), a truncated safetensors file by its header,
    a Hugging Face index that is not JSON or lists a missing file. One named error, no retries."""
    from safetensors.torch import save_file

    from pipeline.config import validate
    from pipeline.flows.train import train_task
    from pipeline.training.checkpoint import check_init_weights
    from tests.conftest import tiny_raw

    folder = tmp_path / "model"
    write_model(folder, {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, {"kind": "test"})
    check_init_weights(folder, "k")  # intact
    _flip(folder / WEIGHTS, 200)
    with pytest.raises(DamagedFile, match=rf"{folder / WEIGHTS} is damaged \(its sha256 differs"):
        check_init_weights(folder, "k")
    single = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(single))
    _truncate(single)
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
