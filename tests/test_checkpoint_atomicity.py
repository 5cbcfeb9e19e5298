"""Checkpoints and artifacts appear whole or not at all: an interrupted write leaves the previous
checkpoint the one that loads, and only the newest `keep_last_k` are kept."""

from __future__ import annotations

import json

import pytest

from pipeline.atomic import atomic_dir
from pipeline.training.checkpoint import META, CheckpointError, read_meta
from pipeline.training.session import LocalSession


def _ckpt(tmp_path, step: int):
    d = tmp_path / f"src-{step}"
    d.mkdir()
    (d / "state.pt").write_bytes(b"x" * 16)
    (d / META).write_text(json.dumps({"step": step}))
    return d


def test_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    root = tmp_path / "run"
    session = LocalSession(root)
    session.report({"step": 10}, _ckpt(tmp_path, 10))
    # a crash while copying step 20: the staging folder exists, half-written, never renamed
    staging = root / "checkpoint_00000020.tmp"
    staging.mkdir()
    (staging / "state.pt").write_bytes(b"x" * 3)
    # and a folder whose marker was never written (killed between the state and meta.json)
    (root / "checkpoint_00000030").mkdir()
    with LocalSession(root).latest_checkpoint() as latest:
        assert latest == root / "checkpoint_00000010" and read_meta(latest)["step"] == 10
    with pytest.raises(CheckpointError, match="incomplete"):
        read_meta(root / "checkpoint_00000030")


def test_rereport_stopped_mid_replace_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    """A finished run run again reports its last checkpoint again, replacing the folder of the
    same step. Stopped between moving the old copy aside and renaming the new one in, the next
    start resumes from the copy moved aside (it had deleted it first, and then the new copy as
    stale), and the next report puts it back under its name."""
    from pathlib import Path

    root = tmp_path / "run"
    LocalSession(root).report({"step": 6}, _ckpt(tmp_path, 6))
    rename = Path.rename

    def stopped(self, target):
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt("stopped before the new copy got its name")
        return rename(self, target)

    (tmp_path / "again").mkdir()
    again = _ckpt(tmp_path / "again", 6)
    monkeypatch.setattr(Path, "rename", stopped)
    with pytest.raises(KeyboardInterrupt):
        LocalSession(root).report({"step": 6}, again)
    monkeypatch.setattr(Path, "rename", rename)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000006.old", "checkpoint_00000006.tmp"]
    with LocalSession(root).latest_checkpoint() as latest:  # (read on every rank as it is: no rename)
        assert latest == root / "checkpoint_00000006.old" and read_meta(latest)["step"] == 6
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000006.old"]
    LocalSession(root, keep_last_k=1).report({"step": 9}, _ckpt(tmp_path, 9))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000009"]  # put back, then kept last 1
    # stopped after the rename but before the old copy was dropped: the new one is the checkpoint
    (root / "checkpoint_00000009.old").mkdir()
    (root / "checkpoint_00000009.old" / META).write_text(json.dumps({"step": 9}))
    with LocalSession(root).latest_checkpoint() as latest:
        assert latest == root / "checkpoint_00000009"
    LocalSession(root).report({"step": 12}, _ckpt(tmp_path, 12))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000009", "checkpoint_00000012"]


def test_ray_run_without_its_checkpoint_list_loses_no_complete_checkpoint(tmp_path, capsys):
    """Ray Train's snapshot file missing: a folder holding the loop's meta.json is set aside (kept,
    not resumed from) instead of deleted; one without it is a write cut short and goes."""
    from pipeline.runtime.recovery import SET_ASIDE, SNAPSHOT, remove_unfinished

    run = tmp_path / "run"
    run.mkdir()
    done = _ckpt(tmp_path, 6)
    done.rename(run / "checkpoint_2026-12-06_00-00-01.000000")
    (run / "checkpoint_2026-12-06_00-00-02.000000").mkdir()  # never got its meta.json
    assert remove_unfinished(run, "lm") == ["checkpoint_2026-12-06_00-00-02.000000"]
    assert sorted(p.name for p in run.iterdir()) == [f"checkpoint_2026-12-06_00-00-01.000000{SET_ASIDE}"]
    out = capsys.readouterr().out
    assert f"[lm] {run / SNAPSHOT} (Ray Train's list of checkpoints) is missing: set aside 1 checkpoint" in out
    # after a full disk on the run's first checkpoint its folders are half-written: deleted, space freed
    (run / "checkpoint_2026-12-06_00-00-03.000000").mkdir()
    (run / "checkpoint_2026-12-06_00-00-03.000000" / META).write_text("{}")
    assert remove_unfinished(run, "lm", set_aside=False) == ["checkpoint_2026-12-06_00-00-03.000000"]


def test_keep_last_k(tmp_path):
    root = tmp_path / "run"
    session = LocalSession(root, keep_last_k=2)
    for step in (5, 10, 15, 20):
        session.report({"step": step}, _ckpt(tmp_path, step))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000015", "checkpoint_00000020"]


def test_atomic_dir_keeps_the_old_artifact_when_the_writer_dies(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as d:
        (d / "model.safetensors").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "model.safetensors").write_text("half of v2")
        raise RuntimeError("killed mid-write")
    assert (target / "model.safetensors").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind


def test_atomic_file_gets_the_mode_a_plain_write_gives(tmp_path):
    """An atomically written file (params.yaml from `pipeline compose`, metrics, records) is
    readable as a plain write would leave it: not mkstemp's private 0600."""
    import os

    from pipeline.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "params.yaml", "seed: 1\n")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.yaml", "seed: 1\n")
    finally:
        os.umask(old)
    assert (tmp_path / "params.yaml").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.yaml").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "params.yaml").read_text() == "seed: 1\n"
