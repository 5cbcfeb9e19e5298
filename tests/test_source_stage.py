"""The source stage: prepare reruns when the raw data it reads changes, and only then.

`data.source` is a value in params.yaml, so the files it names were no DVC dependency: editing one
left `dvc repro` skipping prepare. The real `dvc repro` of a tiny copy of the project, with a
local text folder as the source, shows the record (`data/lm/source.json`) carrying the change."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.data.fingerprint import source_fingerprint


def test_the_record_changes_with_what_prepare_reads_only(tmp_path):
    cache = tmp_path / "hashes.json"
    src = tmp_path / "raw"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("one paragraph\n")
    (src / "sub" / "b.md").write_text("another\n")
    (src / ".hidden").write_text("never data\n")
    (src / "archive.tar.gz").write_bytes(b"not a file prepare reads")
    first = source_fingerprint(str(src), "text", cache=cache)
    assert sorted(first["files"]) == ["a.txt", "sub/b.md"]
    assert len(json.loads(cache.read_text())) == 2  # hashed once per size, mtime and inode
    (src / "a.txt").touch()  # a new mtime (a fresh clone, `dvc pull`) is no change
    (src / ".hidden").write_text("edited\n")
    (src / "archive.tar.gz").write_bytes(b"edited, still not read")
    assert source_fingerprint(str(src), "text", cache=cache) == first
    (src / "a.txt").write_text("one paragraph, edited\n")
    assert source_fingerprint(str(src), "text", cache=cache) != first
    assert source_fingerprint("builtin:python-docs")["builtin"]["python"] == ".".join(map(str, sys.version_info[:3]))
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "1.PNG").write_bytes(b"png bytes")
    (images / "cat" / "notes.txt").write_text("not an image")
    assert list(source_fingerprint(str(images), "images", cache=None)["files"]) == ["cat/1.PNG"]


def test_a_file_uri_and_a_damaged_cache_give_the_plain_paths_record(tmp_path):
    """A `file://` source (prepare reads it) crashed the stage on os.stat of the URI; a hash cache
    another writer left as a list crashed every stage and lineage: it is no cache."""
    src, cache = tmp_path / "raw", tmp_path / "hashes.json"
    src.mkdir()
    (src / "a.txt").write_text("one paragraph\n")
    plain = source_fingerprint(str(src), "text", cache=None)
    assert source_fingerprint(f"file://{src}", "text", cache=None)["files"] == plain["files"]
    cache.write_text("[]")
    assert source_fingerprint(str(src), "text", cache=cache) == plain
    assert list(json.loads(cache.read_text())) == [str((src / "a.txt").resolve())]


def test_a_tokenizer_from_a_checkpoint_is_part_of_the_record(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights are not read by prepare")
    first = source_fingerprint("builtin:python-docs", "text", str(ckpt), cache=None)
    assert list(first["tokenizer_from"]) == ["tokenizer.json"]
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    assert source_fingerprint("builtin:python-docs", "text", str(ckpt), cache=None) == first
    (ckpt / "tokenizer.json").write_text('{"edited": 1}')
    assert source_fingerprint("builtin:python-docs", "text", str(ckpt), cache=None) != first


def test_the_weights_record_changes_with_the_weights_only(tmp_path):
    """Weights replaced at the same `init_from` path were no dependency of anything: `dvc repro`
    kept the model trained from the old ones. The train stage's record (`data/<task>/init_from.json`)
    hashes each file the run's fingerprint reads; a new mtime is no change, new bytes are."""
    from pipeline.data.fingerprint import init_fingerprint, write_init_record
    from pipeline.tracking.lineage import weights_fingerprint

    cache, ckpt = tmp_path / "hashes.json", tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "README.md").write_text("not read by training")
    first = init_fingerprint(str(ckpt), cache=cache)
    assert sorted(first["files"]) == ["config.json", "model.safetensors"] and first["init_from"] == str(ckpt)
    run_fingerprint = weights_fingerprint(ckpt)
    (ckpt / "model.safetensors").touch()
    (ckpt / "README.md").write_text("edited")
    assert init_fingerprint(str(ckpt), cache=cache) == first and weights_fingerprint(ckpt) == run_fingerprint
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    assert init_fingerprint(str(ckpt), cache=cache) != first and weights_fingerprint(ckpt) != run_fingerprint
    single = ckpt / "model.safetensors"  # trainer.init_from: one file
    assert list(init_fingerprint(str(single), cache=None)["files"]) == ["model.safetensors"]
    assert init_fingerprint(None) == {"init_from": None}

    out = tmp_path / "data" / "lm" / "init_from.json"
    out.parent.mkdir(parents=True)
    assert write_init_record(None, out) == "no init_from" and json.loads(out.read_text()) == {"init_from": None}
    assert write_init_record(str(ckpt), out) == f"init_from {ckpt}: 2 files hashed"
    recorded = out.read_bytes()
    shutil.rmtree(ckpt)  # not on this machine (a `dvc pull` copy, a queued experiment): the record is kept
    assert write_init_record(str(ckpt), out).endswith(f"kept the record of {out}") and out.read_bytes() == recorded
    out.unlink()
    assert "recorded as unavailable" in write_init_record(str(ckpt), out)


def test_lineage_says_when_the_init_weights_changed(tmp_path, monkeypatch):
    """`pipeline lineage` compares the workspace with the records, as `dvc repro` would after running
    the source stage: weights replaced at the `init_from` path are a difference; weights not on
    this machine are a note."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from pipeline.data.fingerprint import write_init_record
    from pipeline.tracking.inspect import _source_changed
    from tests.conftest import tiny_raw

    weights = tmp_path / "init.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw([f"tasks.lm.trainer.init_from={weights}"])))
    monkeypatch.chdir(tmp_path)
    write_init_record(str(weights), Path("data/lm/init_from.json"))
    assert _source_changed("lm") == ([], [])
    save_file({"w": torch.ones(2)}, str(weights))
    assert _source_changed("lm") == (["init_from weights changed since data/lm/init_from.json was recorded"], [])
    weights.unlink()
    differences, notes = _source_changed("lm")
    assert differences == [] and notes[0].startswith("the init_from weights are not readable here"), notes


def test_a_source_not_on_this_machine_keeps_the_record(tmp_path):
    """A machine with the prepared data but not the raw data (`dvc pull`, a queued experiment's
    copy of the workspace) wrote an empty record, so prepare reran and failed: the record there is
    is kept; with none, the source is recorded as unavailable and prepare names the problem."""
    from pipeline.data.fingerprint import write_record

    src, out = tmp_path / "raw", tmp_path / "data" / "lm" / "source.json"
    src.mkdir()
    (src / "a.txt").write_text("one paragraph\n")
    assert "1 file hashed" in write_record(str(src), "text", None, out)
    recorded = out.read_bytes()
    shutil.rmtree(src)
    assert "kept the record" in write_record(str(src), "text", None, out) and out.read_bytes() == recorded
    out.unlink()
    assert "recorded as unavailable" in write_record(str(src), "text", None, out)
    assert json.loads(out.read_text())["unavailable"].endswith("is not on this machine")


def test_a_remote_object_without_checksum_or_time_is_hashed():
    """A store whose listing gives no checksum and no modification time recorded `size:None`, so an
    edit of the same size went unseen; its contents are hashed instead."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus-fp/a.txt", b"hello")
    first = source_fingerprint("memory://corpus-fp", "text", cache=None)
    fs.pipe("/corpus-fp/a.txt", b"HELLO")
    assert source_fingerprint("memory://corpus-fp", "text", cache=None) != first
    fs.rm("/corpus-fp", recursive=True)


@pytest.mark.e2e
def test_editing_the_raw_data_reruns_prepare_through_dvc(tmp_path, text_corpus, monkeypatch):
    """...and `pipeline lineage`'s comparison with the workspace says so (recomputing the record,
    which `dvc status` cannot: it only says the stage is always changed, which lineage leaves out)."""
    from pipeline.tracking.inspect import _dvc_differences, _source_changed
    from tests.e2e_project import run_ok, tiny_project

    raw = tmp_path / "raw"
    shutil.copytree(text_corpus, raw)
    project = tiny_project(tmp_path / "project", (f"tasks.lm.data.source={raw}",))
    first = run_ok(["dvc", "repro", "prepare@lm"], project)
    assert "Running stage 'source@lm'" in first and "Running stage 'prepare@lm'" in first, first[-3000:]
    documents = json.loads((project / "metrics/lm/data.json").read_text())["documents_raw"]
    record = json.loads((project / "data/lm/source.json").read_text())
    assert record["source"] == str(raw) and len(record["files"]) == len(list(text_corpus.glob("*.txt")))
    assert json.loads((project / "data/lm/init_from.json").read_text()) == {"init_from": None}  # (train's record)

    again = run_ok(["dvc", "repro", "prepare@lm"], project)
    assert "Stage 'prepare@lm' didn't change, skipping" in again, again[-3000:]

    monkeypatch.chdir(project)
    before = _dvc_differences("lm")
    assert not [d for d in before if "source" in d], before
    assert _source_changed("lm") == ([], [])
    name = sorted(record["files"])[0]
    (raw / name).write_text((raw / name).read_text() + "\n\nA paragraph added to the raw data after prepare.\n")
    status = run_ok(["dvc", "status", "--with-deps", "prepare@lm"], project)
    assert "source@lm:\n\talways changed" in status, status  # (DVC knows only by running the source stage)
    assert _dvc_differences("lm") == before  # ("always changed" left out)
    assert _source_changed("lm") == (["data source changed since data/lm/source.json was recorded"], [])
    moved = raw.rename(tmp_path / "elsewhere")  # the raw data not on this machine: a note, not a difference
    differences, notes = _source_changed("lm")
    assert differences == [] and notes[0].startswith("the raw data source is not readable here"), notes
    recorded = (project / "data/lm/source.json").read_bytes()
    # and `dvc repro` keeps the record (DVC deleted a stage's outs before running it: the record was
    # rewritten as unavailable and prepare reran and failed), so prepare keeps its output
    kept = run_ok(["dvc", "repro", "prepare@lm"], project)
    assert "kept the record of data/lm/source.json" in kept and "Running stage 'prepare@lm'" not in kept, kept[-3000:]
    assert (project / "data/lm/source.json").read_bytes() == recorded
    moved.rename(raw)
    rerun = run_ok(["dvc", "repro", "prepare@lm"], project)
    assert "Running stage 'prepare@lm'" in rerun, rerun[-3000:]
    assert json.loads((project / "metrics/lm/data.json").read_text())["documents_raw"] == documents + 1
