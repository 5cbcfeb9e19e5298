"""Damaged sources: a broken `configs/` file, a damaged or ill-valued image source, an export
killed while MLflow logged its model, and a text line that is one enormous word each get one
line naming the file and the problem (or, for the last two, no lasting harm) instead of a
traceback, silent damage, a leftover folder or a stalled prepare."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.atomic import _writer_tag
from pipeline.config import ConfigError, compose
from pipeline.config.schema import ImageDataConfig, TextDataConfig
from pipeline.data.build import prepare
from pipeline.data.sources import DataSourceError, read_images
from pipeline.data.text import MAX_WORD_CHARS, _capped_words
from pipeline.export.pyfunc import pyfunc_staging

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- configs/ YAML
@pytest.mark.parametrize(("file", "edit", "expected"), [
    ("model/gpt_small.yaml", lambda t: t.replace("d_model: ", "d_model: [", 1),
     r"not valid YAML: expected ',' or '\]', but got ':' \(line \d+, column \d+\)"),
    ("config.yaml", lambda t: t + "seed: [1\n", r"not valid YAML: expected ',' or '\]', but got '<stream end>'"),
    ("config.yaml", lambda t: t + "seed: 2\n", r"not valid YAML: found duplicate key seed \(line \d+"),
    ("model/gpt_small.yaml", lambda t: t + "n_layers: 3\nn_layers: 4\n", r"not valid YAML: found duplicate key"),
    ("model/gpt_small.yaml", lambda t: t + "# caf\udce9\n", r"not UTF-8 text \(byte \d+\)"),
    ("config.yaml", lambda t: "# caf\udce9\n" + t, r"not UTF-8 text \(byte 5\)"),
], ids=["group-syntax", "config-syntax", "config-duplicate", "group-duplicate", "group-latin1", "config-latin1"])
def test_damaged_config_file_is_one_line_naming_it(tmp_path, file, edit, expected):
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    path = configs / file
    path.write_bytes(edit(path.read_text(encoding="utf-8")).encode("utf-8", errors="surrogateescape"))
    with pytest.raises(ConfigError, match=rf"^{path.resolve()}: {expected}") as err:
        compose(configs, [])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- images: .npz
def _npz(tmp_path: Path, images=None, labels=None, name: str = "raw.npz") -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 8, 8), dtype=np.uint8) if images is None else images
    labels = np.arange(20) % 4 if labels is None else labels
    np.savez(tmp_path / name, images=images, labels=labels)
    return tmp_path / name


def _nan_images() -> np.ndarray:
    x = np.random.default_rng(1).random((20, 8, 8), dtype=np.float32)
    x[7, 3, 3] = np.nan
    return x


@pytest.mark.parametrize(("arrays", "expected"), [
    ({"images": _nan_images()}, "image 7 has NaN or infinite pixel values"),
    ({"labels": np.arange(20) % 4 + 0.5}, r"label 0\.5 of image 0 is not an integer class id"),
    ({"labels": np.where(np.arange(20) == 5, -1, 2)}, "label -1 of image 5 is negative"),
    ({"labels": np.where(np.arange(20) == 5, 100000, 2)}, "largest label 100000 means 100,001 classes, more than "
                                                          "the 20 images"),
    ({"images": np.zeros((0, 8, 8)), "labels": np.zeros(0, dtype=np.int64)}, "'images' must be a non-empty"),
    ({"labels": np.arange(19) % 4}, "'labels' must hold one class id per image"),
    ({"labels": np.array(["cat"] * 20)}, "'labels' must be integer class ids"),
    ({"images": np.zeros((20, 8, 8, 3))}, r"'images' is N x C x H x W with C = 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\) "
                                          r"channels; got shape \(20, 8, 8, 3\) \(channels last\? transpose it"),
    ({"images": np.zeros((20, 5, 8, 8))}, r"'images' is N x C x H x W .*got shape \(20, 5, 8, 8\)$"),
], ids=["nan-pixels", "float-labels", "negative-label", "huge-label", "empty", "label-count", "string-labels",
        "channels-last", "five-channels"])
def test_damaged_npz_values_are_refused_naming_the_file(tmp_path, arrays, expected):
    src = _npz(tmp_path, **arrays)
    with pytest.raises(DataSourceError, match=rf"^{src}: {expected}") as err:
        read_images(str(src))
    assert "\n" not in str(err.value)


def test_damaged_npz_integral_float_labels_are_accepted(tmp_path):
    x, y, n = read_images(str(_npz(tmp_path, labels=(np.arange(20) % 4).astype(np.float32))))
    assert y.dtype == np.int64 and y.tolist() == (np.arange(20) % 4).tolist() and n == 4 and x.shape == (20, 1, 8, 8)


def test_damaged_npz_a_small_subset_of_many_classes_is_accepted(tmp_path):
    """Fewer images than classes is fine up to MAX_SPARSE_CLASSES (50 images of CIFAR-100's 100
    classes); the refusal above is for labels no class table should be sized by."""
    x, y, n = read_images(str(_npz(tmp_path, labels=np.arange(20) * 5)))  # labels 0..95, 20 images
    assert n == 96 and y.max() == 95 and len(x) == 20


@pytest.mark.parametrize("damage", ["truncated", "not-a-zip", "npy"])
def test_damaged_npz_file_is_refused_naming_it(tmp_path, damage):
    src = _npz(tmp_path)
    if damage == "truncated":
        src.write_bytes(src.read_bytes()[:300])
    elif damage == "not-a-zip":
        src.write_text("images and labels, honest")
    else:
        np.save(tmp_path / "one.npy", np.zeros(3))
        (tmp_path / "one.npy").rename(src)
    with pytest.raises(DataSourceError, match=rf"^{src}: (not a readable \.npz file|a single \.npy array)") as err:
        read_images(str(src))
    assert "\n" not in str(err.value)


def test_damaged_npz_stops_prepare_before_anything_is_written(tmp_path):
    src = _npz(tmp_path, images=_nan_images())
    with pytest.raises(DataSourceError, match="NaN"):
        prepare(ImageDataConfig(source=str(src)), 0, tmp_path / "prepared")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.npz"]  # no prepared folder, no temporary


# ----------------------------------------------------------------------------- images: class folders
def _folders(tmp_path: Path, sizes: dict[str, list[int]]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, sides in sizes.items():
        folder = tmp_path / "src" / cls
        folder.mkdir(parents=True)
        for i, side in enumerate(sides):
            Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path / "src"


def test_damaged_class_folder_image_is_named(tmp_path):
    src = _folders(tmp_path, {"a": [6, 6], "b": [6, 6]})
    (src / "b" / "bad.png").write_text("not a picture")
    with pytest.raises(DataSourceError, match=rf"^{src}/b/bad\.png: not an image PIL can read$"):
        read_images(str(src))
    (src / "b" / "bad.png").write_bytes((src / "a" / "0.png").read_bytes()[:60])  # a truncated PNG
    with pytest.raises(DataSourceError, match=rf"^{src}/b/bad\.png: not a readable image") as err:
        read_images(str(src))
    assert "\n" not in str(err.value)


def test_damaged_class_folders_without_images_say_so(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        (src / cls / "notes.txt").write_text("no pictures here")
    with pytest.raises(DataSourceError, match=rf"^{src}/a: no images \(\.png, \.jpg, \.jpeg, \.bmp\) found under"):
        read_images(str(src))
    src2 = _folders(tmp_path / "two", {"a": [6], "b": []})
    with pytest.raises(DataSourceError, match=rf"^{src2}/b: no images"):
        read_images(str(src2))
    src3 = _folders(tmp_path / "three", {"a": [6], "b": [6]})  # hidden and system folders are no classes
    for hidden in (".ipynb_checkpoints", "__MACOSX"):
        (src3 / hidden).mkdir()
    assert read_images(str(src3))[2] == 2


def test_damaged_class_folder_image_of_another_size_is_named(tmp_path):
    src = _folders(tmp_path, {"a": [6, 6], "b": [6, 7]})
    with pytest.raises(DataSourceError, match=rf"^{src}/b/1\.png: size \(7, 7\) differs from {src}/a/0\.png's "
                                              r"\(6, 6\)"):
        read_images(str(src))


# ----------------------------------------------------------------------------- export: pyfunc staging
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_damaged_export_staging_left_by_a_killed_writer_is_removed(tmp_path):
    """A staging folder is named after its writer: the next export in the same folder removes one
    whose writer is dead, keeps a live writer's, and removes its own on the way out."""
    host, pidns, _ = _writer_tag().rsplit("-", 2)
    stale = tmp_path / f".pyfunc.tmp-{host}-{pidns}-{_dead_pid()}-abcd1234"
    live = tmp_path / f".pyfunc.tmp-{host}-{pidns}-1-abcd1234"  # pid 1 is alive
    for d in (stale, live):
        (d / "model_dir").mkdir(parents=True)
    with pyfunc_staging(tmp_path) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(f".pyfunc.tmp-{_writer_tag()}-")
        assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
    with pytest.raises(RuntimeError), pyfunc_staging(tmp_path) as staging:
        raise RuntimeError("MLflow failed")
    assert not staging.exists()


def test_damaged_export_staging_of_a_killed_export_goes_next_time(tmp_path):
    """A process killed (SIGKILL) inside the staging block leaves it; the next one removes it."""
    code = ("import os, sys; from pathlib import Path; from pipeline.export.pyfunc import pyfunc_staging\n"
            "with pyfunc_staging(Path(sys.argv[1])) as s:\n    os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, timeout=60)
    assert len(list(tmp_path.glob(".pyfunc.tmp-*"))) == 1
    with pyfunc_staging(tmp_path) as staging:
        assert list(tmp_path.iterdir()) == [staging]
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- text: one enormous word
def test_damaged_long_word_is_cut_for_tokenizer_training_only():
    doc = "ab " + "x" * 600 + " cd " + "y" * 300 + " e"
    pieces = _capped_words(doc)
    assert "".join(pieces) == doc and len(pieces) == 4
    assert all(len(w) <= MAX_WORD_CHARS for p in pieces for w in p.split())
    normal = "An ordinary paragraph, with https://example.org/a/long/but/not/enormous/address and words."
    assert _capped_words(normal) == [normal]


def test_damaged_one_character_million_char_line_prepares(tmp_path):
    """A million-character line of one repeated character (it stalled the BPE trainer) prepares
    quickly, and reaches the tokenizer (it lands in the train split)."""
    src = tmp_path / "src.txt"
    prose = [f"Paragraph {i} says something ordinary about the weather and the trains." for i in range(40)]
    src.write_text("\n\n".join([*prose, "x" * 1_000_000]) + "\n", encoding="utf-8")
    stats = prepare(TextDataConfig(source=str(src), vocab_size=300, min_chars=10), 0, tmp_path / "out")
    train = pq.read_table(tmp_path / "out" / "train.parquet")["text"].to_pylist()
    assert any(len(d) == 1_000_000 for d in train), "the long line is not in the train split: pick another seed"
    assert stats["tokenizer_documents"] == len(train) and (tmp_path / "out" / "tokenizer.json").is_file()
    assert os.path.getsize(tmp_path / "out" / "tokenizer.json") > 0
