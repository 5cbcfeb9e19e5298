"""Damaged checkpoints in the loop (issue 21): a truncated or bit-flipped checkpoint, damaged
records, a full disk, and the half-written checkpoint folders a crash leaves behind. Each file a
checkpoint holds has its size and sha256 recorded when it is written; a damaged one is named in
one line, a resume passes over it to the newest intact checkpoint, and nothing is retried for it."""

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
    META,
    STATE,
    CheckpointError,
    DamagedFile,
    load_training_state,
    read_meta,
    seal_checkpoint,
    verify_checkpoint,
)
from pipeline.training.loop import train
from pipeline.training.session import LocalSession
from tests.conftest import ROOT
from tests.damage import flip, truncate


def _state(root: Path) -> dict[str, torch.Tensor]:
    state, _ = load_training_state(sorted(root.glob("checkpoint_*"))[-1])
    return state["model"]


@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "flipped"])
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
        truncate(root / f"checkpoint_{step:08d}" / STATE)
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
        truncate(d / STATE)
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
                           "tests.test_damaged_state", str(tmp_path), str(shards["lm"])],
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


if __name__ == "__main__":
    _full_disk(Path(sys.argv[1]), Path(sys.argv[2]))


def test_checkpoints_past_step_99999999_are_ordered_by_step(tmp_path):
    """Step folders are named with 8 digits and were ordered by name: `checkpoint_100000000` came
    before `checkpoint_99999999`, so with keep_last_k=1 the checkpoint just written was deleted and
    a resume (LocalSession's, and the driver's for Horovod) picked the older step."""
    from pipeline.runtime.recovery import _recover_steps

    root = tmp_path / "run"
    root.mkdir()
    session = LocalSession(root, keep_last_k=1)
    for step in (99_999_999, 100_000_000):
        written = tmp_path / f"written-{step}"
        written.mkdir()
        (written / STATE).write_bytes(os.urandom(64))
        seal_checkpoint(written, 0, 1, {"step": step})
        session.report({"step": step}, written)
    assert [p.name for p in root.iterdir()] == ["checkpoint_100000000"]
    with LocalSession(root).latest_checkpoint() as latest:
        assert latest.name == "checkpoint_100000000"
    (root / "checkpoint_99999999").mkdir()  # an older one beside it: still the newest is resumed
    (root / "checkpoint_99999999" / STATE).write_bytes(os.urandom(64))
    seal_checkpoint(root / "checkpoint_99999999", 0, 1, {"step": 99_999_999})
    assert _recover_steps(root, "lm").resumed_step == 100_000_000
