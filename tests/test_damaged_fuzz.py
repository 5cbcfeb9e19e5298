"""A fuzzing pass over damaged inputs and state (hypothesis): shards, manifests, checkpoints,
model folders, configs and text files are damaged at random (truncated, bytes flipped,
deleted, wrong types, wrong encodings). Every case must end in one of two ways: a one-line
error of a known kind that names the damaged file or key, or a named fallback (an older intact
checkpoint, a re-decoded or refused file counted in the statistics). Nothing half-written is
left under a final name, and no earlier artifact is lost.

Bounded: a few dozen examples per target, no deadline per example, about a minute in all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, validate
from pipeline.config.loading import flatten
from pipeline.data.shard_format import MANIFEST, ShardError, load_manifest
from pipeline.data.shard_verify import verify_split
from pipeline.training.checkpoint import CheckpointError, load_model, newest_intact, write_model
from pipeline.training.loop import train
from pipeline.training.session import LocalSession
from tests.conftest import tiny_raw

FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg.strip(), f"not one line: {msg!r}"
    return msg


@st.composite
def damage(draw) -> tuple[str, int, bytes]:
    """(how, where as a fraction of the file in 1/1000, what is written)."""
    how = draw(st.sampled_from(["truncate", "flip", "delete", "empty", "garbage"]))
    return how, draw(st.integers(0, 999)), draw(st.binary(min_size=1, max_size=64))


def apply(path: Path, spec: tuple[str, int, bytes]) -> bool:
    """Damage `path` as `spec` says; False when the damage happens to leave the bytes unchanged."""
    how, where, junk = spec
    data = path.read_bytes()
    at = len(data) * where // 1000
    if how == "delete":
        path.unlink()
        return True
    new = {"truncate": data[:at], "empty": b"", "garbage": junk,
           "flip": data[:at] + bytes(b ^ 0xFF for b in data[at:at + len(junk)]) + data[at + len(junk):]}[how]
    path.write_bytes(new)
    return new != data


# ----------------------------------------------------------------------------- shards and manifests
@FUZZ
@given(spec=damage(), pick=st.integers(0, 10_000))
def test_damaged_shards_fuzz(built_data, tmp_path_factory, spec, pick):
    _, shards = built_data
    root = tmp_path_factory.mktemp("shards")
    shutil.copytree(shards["lm"], root, dirs_exist_ok=True)
    files = sorted(p for p in root.iterdir() if p.name.startswith("train-"))
    target = files[pick % len(files)]
    if not apply(target, spec):
        verify_split(root, "train")
        return
    with pytest.raises(ShardError) as err:
        verify_split(root, "train")
    assert target.name in one_line(err.value)


@FUZZ
@given(spec=damage(), replace=st.one_of(st.none(), st.sampled_from(
    [[], 3, "x", {"splits": []}, {"splits": {"train": 1}}, {"splits": {"train": {"shards": "x"}}}])))
def test_damaged_manifest_fuzz(built_data, tmp_path_factory, spec, replace):
    """Random damage, or valid JSON of the wrong shape: the manifest is named, or (when the
    damage happens to leave a readable manifest) the split still verifies."""
    _, shards = built_data
    root = tmp_path_factory.mktemp("manifest")
    shutil.copytree(shards["lm"], root, dirs_exist_ok=True)
    if replace is not None:
        (root / MANIFEST).write_text(json.dumps(replace))
    elif not apply(root / MANIFEST, spec):
        return
    try:
        verify_split(root, "train", load_manifest(root))
    except ShardError as e:
        assert MANIFEST in one_line(e) or "train-" in str(e)
    except (KeyError, TypeError, AttributeError) as e:  # a shape the manifest check let through
        pytest.fail(f"{type(e).__name__} instead of a ShardError naming the manifest: {e}")


# ----------------------------------------------------------------------------- checkpoints and models
@pytest.fixture(scope="module")
def checkpoints(built_data, tmp_path_factory) -> Path:
    """A tiny run's checkpoints at steps 3 and 6."""
    cfg, shards = built_data
    root = tmp_path_factory.mktemp("ckpts")
    train(cfg, "lm", shards["lm"], LocalSession(root / "run"))
    return root / "run"


@FUZZ
@given(spec=damage(), pick=st.integers(0, 10_000))
def test_damaged_checkpoint_fuzz(checkpoints, tmp_path_factory, spec, pick):
    """Any file of the newest checkpoint damaged: the resume falls back to the older one and
    names the damaged file; the older checkpoint is untouched."""
    root = tmp_path_factory.mktemp("ck") / "run"
    shutil.copytree(checkpoints, root)
    steps = sorted(root.glob("checkpoint_*"))
    files = sorted(p for p in steps[-1].rglob("*") if p.is_file())
    target = files[pick % len(files)]
    changed = apply(target, spec)
    intact, damaged = newest_intact(sorted(steps, reverse=True))
    if not changed:
        assert intact == steps[-1]
        return
    assert intact == steps[0] and damaged, f"damage to {target.name} went unnoticed"
    assert target.name in one_line(damaged[0]) or steps[-1].name in str(damaged[0])


@FUZZ
@given(spec=damage(), name=st.sampled_from(["model.safetensors", "model_spec.json", "checksums.json"]))
def test_damaged_model_folder_fuzz(built_data, tmp_path_factory, spec, name):
    import torch

    cfg, _ = built_data
    from pipeline.tasks import task_named

    task = task_named("lm")
    spec_ = task.model_spec(cfg.task("lm"), {"vocab_size": 300, "seq_len": 32})
    folder = tmp_path_factory.mktemp("model") / "lm"
    write_model(folder, {k: v.clone() for k, v in task.build(spec_).state_dict().items()}, spec_)
    if not apply(folder / name, spec):
        load_model(folder)
        return
    try:
        load_model(folder)
    except CheckpointError as e:
        assert name in one_line(e) or str(folder) in str(e)
        return
    # a damaged checksum record alone may still leave the weights provably intact: they must load equal
    assert name == "checksums.json", f"damage to {name} went unnoticed"
    assert isinstance(load_model(folder)[0], torch.nn.Module)


# ----------------------------------------------------------------------------- configs
_RAW = tiny_raw()
_KEYS = sorted(flatten(_RAW))
WRONG = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                  st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                             st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(key=st.sampled_from(_KEYS), value=WRONG)
def test_damaged_config_value_fuzz(key, value):
    """A random key given a value of a random type: valid, or one line naming that key."""
    raw = json.loads(json.dumps(_RAW))
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    try:
        validate(raw)
    except ConfigError as e:
        msg = one_line(e)
        assert leaf in msg or parents[-1] in msg, f"{key}={value!r}: {msg}"


# ----------------------------------------------------------------------------- text files
@FUZZ
@given(blob=st.one_of(st.binary(min_size=1, max_size=4000),
                      st.text(min_size=30, max_size=400).map(lambda t: t.encode("utf-16")),
                      st.text(alphabet="àéîõüßçñ abcdefghij\n", min_size=40, max_size=400).map(
                          lambda t: t.encode("latin-1"))))
def test_damaged_text_file_fuzz(tmp_path_factory, text_corpus, blob):
    """One file of random bytes or another encoding beside real text: prepare succeeds and
    counts it (repaired, re-decoded or refused) with no U+FFFD in the data, or stops in one
    line naming the file; a failed prepare leaves no output folder."""
    import pyarrow.parquet as pq

    from pipeline.config.schema import TextDataConfig
    from pipeline.data.build import prepare

    src = tmp_path_factory.mktemp("src")
    for p in sorted(text_corpus.glob("*.txt"))[:4]:
        shutil.copy(p, src / p.name)
    (src / "odd.txt").write_bytes(blob)
    out = tmp_path_factory.mktemp("out") / "prepared"
    try:
        stats = prepare(TextDataConfig(source=str(src), vocab_size=300, min_chars=10), 0, out)
    except (ValueError, RuntimeError) as e:
        assert "odd.txt" in one_line(e)
        assert not out.exists()
        return
    splits = ("train", "val", "test")
    text = "".join(doc for s in splits for doc in pq.read_table(out / f"{s}.parquet")["text"].to_pylist())
    assert "\ufffd" not in text
    assert stats["files_read"] + stats["files_refused"] == 5
    if stats["files_refused"]:
        assert any("odd.txt" in str(f) for f in stats["refused_files"]), stats
