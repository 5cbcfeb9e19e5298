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
from pipeline.data.image_sources import read_images
from pipeline.data.sources import DataSourceError
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
    (src3 / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble")  # hidden files are no images
    images, labels, classes = read_images(str(src3))
    assert classes == 2 and len(images) == len(labels) == 2


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


# ----------------------------------------------------------------------------- text: folders, values, lines, access
def test_damaged_text_folder_links_are_followed_and_junk_skipped(tmp_path):
    """A linked sub-folder of data is read (fsspec's `find` skipped it silently), a link back up
    the tree ends, and hidden or system folders and files are no data (as for image classes)."""
    from pipeline.data.sources import text_units

    store, src = tmp_path / "store", tmp_path / "src"
    (store / "books").mkdir(parents=True)
    (store / "books" / "b.txt").write_text("a book")
    for junk in (".ipynb_checkpoints", "__MACOSX", ".git"):
        (src / junk).mkdir(parents=True)
        (src / junk / "x.txt").write_text("junk")
    (src / "a.txt").write_text("a document")
    (src / "._a.txt").write_text("macOS metadata")
    (src / "books").symlink_to(store / "books")
    (store / "books" / "loop").symlink_to(store)  # store/books/loop/books/... would never end
    units = [Path(u).relative_to(src).as_posix() for u in text_units(str(src))]
    assert units == ["a.txt", "books/b.txt"]
    (tmp_path / "alias").symlink_to(src)  # the source itself a link
    assert [Path(u).name for u in text_units(str(tmp_path / "alias"))] == ["a.txt", "b.txt"]


@pytest.mark.parametrize(("line", "expected"), [
    ('{"text": {"nested": "object"}}', r"b\.jsonl:2: 'text' is an object, not text"),
    ('{"text": ["a", "list"]}', r"b\.jsonl:2: 'text' is a list, not text"),
    ('{"text": 42}', r"b\.jsonl:2: 'text' is a number, not text"),
    ('"a bare string that mentions text"', r"b\.jsonl:2: a string, not a JSON object with a field 'text'"),
], ids=["object", "list", "number", "bare-string"])
def test_damaged_jsonl_values_that_are_not_text_are_refused(tmp_path, line, expected):
    from pipeline.data.sources import Decoding, read_text_unit

    src = tmp_path / "b.jsonl"
    src.write_text('{"text": "first document"}\n' + line + '\n{"text": null}\n')
    with pytest.raises(DataSourceError, match=rf"^{tmp_path}/{expected}") as err:
        list(read_text_unit(str(src)))
    assert "\n" not in str(err.value)
    src.write_text('{"text": "first document"}\n{"text": null}\n{"text": "second"}\n')
    decoding = Decoding()
    assert list(read_text_unit(str(src), decoding=decoding)) == ["first document", "second"]  # not "None"
    assert decoding.null_values == 1
    docs = "\n".join(f'{{"text": "document number {i} of a small corpus, long enough to keep"}}' for i in range(60))
    src.write_text(docs + '\n{"text": null}\n')
    stats = prepare(TextDataConfig(source=str(src), vocab_size=300, min_chars=10), 0, tmp_path / "out")
    assert stats["skipped_null_values"] == 1  # counted in data.json, beside the other skips


def test_damaged_parquet_binary_column_is_decoded_or_named(tmp_path):
    import pyarrow as pa

    from pipeline.data.sources import Decoding, read_text_unit

    src = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"caf\xc3\xa9 first", None, b"second\nline"], pa.binary())}), src)
    decoding = Decoding()
    assert list(read_text_unit(str(src), decoding=decoding)) == ["café first", "second\nline"]  # not "b'caf\\xc3..'"
    assert decoding.null_values == 1
    pq.write_table(pa.table({"text": pa.array([b"fine", b"caf\xe9"], pa.binary())}), src)
    with pytest.raises(DataSourceError, match=rf"^{src}: row 1: 'text' holds bytes that are not UTF-8 text \(byte 3"):
        list(read_text_unit(str(src)))
    pq.write_table(pa.table({"text": [1, 2]}), src)
    with pytest.raises(DataSourceError, match=rf"^{src}: row 0: 'text' is a number, not text"):
        list(read_text_unit(str(src)))


def test_damaged_one_enormous_line_is_cut_and_streamed(tmp_path, monkeypatch):
    """One line is never held whole: it comes as documents of at most MAX_PARAGRAPH_CHARS, cut
    at a space when there is one near the limit (a 55 MB line took 5.7 GB in prepare)."""
    import io

    from pipeline.data import sources

    monkeypatch.setattr(sources, "MAX_PARAGRAPH_CHARS", 1000)
    monkeypatch.setattr(sources, "CUT_WINDOW", 100)
    words = " ".join(f"word{i % 97}" for i in range(3000))
    (tmp_path / "long.txt").write_text("before\n\n" + words + "\n" + "x" * 2500 + "\n\nafter\n")
    docs = list(sources.read_text_unit(str(tmp_path / "long.txt")))
    assert docs[0] == "before" and docs[-1] == "after" and max(map(len, docs)) <= 1000
    assert "".join(docs[1:-1]) == words + "x" * 2500  # nothing lost, no newline added at a cut
    assert len(docs) > 20 and all(d.endswith(" ") for d in docs[1:-5])  # cut at spaces: no word split
    assert [len(d) for d in docs[-4:-1]] == [1000, 1000, 500]  # no space near the limit: cut at it

    big = io.BytesIO(("word " * (3 * sources.SNIFF_BYTES // 5)).encode())  # one 3 MiB line
    first = next(sources.decode_lines(big, "big.txt", max_line=1000))
    assert len(first) <= 1000 and big.tell() <= sources.SNIFF_BYTES


def test_damaged_unreadable_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A file without read permission (faked: the tests run as root) stops prepare with one line
    naming it, not a 14-frame traceback; any PermissionError a stage meets is one line too."""
    import fsspec.implementations.local as local

    from pipeline.cli import stage_main

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a readable document of some length")
    (tmp_path / "src" / "b_secret.txt").write_text("a secret")
    opener = local.LocalFileSystem._open

    def deny(self, path, *args, **kwargs):
        if path.endswith("b_secret.txt"):
            raise PermissionError(13, "Permission denied", path)
        return opener(self, path, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "_open", deny)
    cfg = TextDataConfig(source=str(tmp_path / "src"), vocab_size=300, min_chars=5)
    with pytest.raises(DataSourceError, match=rf"^{tmp_path}/src/b_secret\.txt: cannot read this file \(Permission "
                                              r"denied\)$"):
        prepare(cfg, 0, tmp_path / "out")

    def denied(*_args):
        raise PermissionError(13, "Permission denied", "data/lm/prepared")

    monkeypatch.setattr("pipeline.cli.load_config", denied)
    with pytest.raises(SystemExit) as exit_:
        stage_main("prepare", denied, ["lm"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error [prepare lm]: [Errno 13] Permission denied: 'data/lm/prepared'\n"


def test_damaged_utf8_repair_warns_and_refuses_runs_of_another_encoding(capsys):
    """Past the first MiB, a stray cp1252 byte is repaired with a warning naming the file; runs
    of them (cp1251 Russian after an ASCII first MiB) are refused, not turned into mojibake."""
    import io

    from pipeline.data.sources import Decoding, decode_lines

    head = ("a" * 79 + "\n").encode() * 13108  # a little over 1 MiB of ASCII
    decoding = Decoding()
    lines = list(decode_lines(io.BytesIO(head + b"caf\xe9 au lait\n"), "mixed.txt", "auto", decoding))
    assert lines[-1] == "café au lait" and decoding.repaired_bytes == 1
    assert "warning: mixed.txt: 1 bytes that are not UTF-8 were read as cp1252" in capsys.readouterr().err
    with pytest.raises(DataSourceError, match=r"^ru\.txt: not UTF-8 from about byte 104864\d: 9 bytes there are not "
                                              r"UTF-8 and most come in runs"):
        list(decode_lines(io.BytesIO(head + "Привет мир\n".encode("cp1251")), "ru.txt"))


def test_damaged_short_file_in_another_encoding_is_refused_not_guessed(tmp_path):
    """69 bytes of KOI8-R Russian are also valid Shift_JIS, and were read as Japanese: below
    MIN_DETECT_BYTES a file that is not UTF-8 is refused, naming it and data.encoding; declared, it
    reads; three times as long, detection still re-decodes it."""
    from pipeline.data.sources import MIN_DETECT_BYTES, Decoding, RefusedFile, read_text_unit

    line = "Привет, как дела? Сегодня хорошая погода, и мы пойдём гулять в парк.\n"
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_bytes(line.encode("koi8-r"))
    long.write_bytes((line * 3).encode("koi8-r"))
    assert len(line.encode("koi8-r")) < MIN_DETECT_BYTES <= 3 * len(line.encode("koi8-r"))
    with pytest.raises(RefusedFile, match=rf"^{short}: not UTF-8, and 69 bytes are too few to detect its encoding; "
                                          r"set data\.encoding"):
        list(read_text_unit(str(short)))
    assert list(read_text_unit(str(short), encoding="koi8-r")) == [line.strip()]
    decoding = Decoding()
    assert list(read_text_unit(str(long), decoding=decoding)) == [(line * 3).strip()]
    assert (decoding.status, decoding.encoding) == ("re-decoded", "koi8_r")
    # a short file of ASCII with a few single stray bytes (a cp1252 quote, Latin-1 umlauts) is read as
    # the repair reads them in longer files, not refused: data.encoding cannot fix one file of a folder
    for text, raw in [("Don’t panic, it’s fine.", "Don’t panic, it’s fine.".encode("cp1252")),
                      ("Grüße aus München", "Grüße aus München".encode("latin-1"))]:
        short.write_bytes(raw + b"\n")
        decoding = Decoding()
        assert list(read_text_unit(str(short), decoding=decoding)) == [text] and decoding.status == "repaired"
    for raw in ["Да, нет.".encode("cp1251"), "Я и ты".encode("cp1251"), "Ναι.".encode("cp1253")]:
        short.write_bytes(raw + b"\n")  # mostly stray bytes: another alphabet, refused, not read as cp1252
        with pytest.raises(RefusedFile, match="too few to detect"):
            list(read_text_unit(str(short)))


RU = "Привет".encode("cp1251")  # (a run of stray bytes: auto refuses it at an offset rather than repair it)


@pytest.mark.parametrize(("encoding", "bad", "expected"), [
    ("utf-8", b"\xff", "not valid utf-8 at byte {at} \\(invalid start byte"),
    ("UTF8", b"\xff", "not valid UTF8 at byte {at} \\(invalid start byte"),
    ("auto", RU, "not UTF-8 from about byte {at}: 6 bytes there are not UTF-8"),
])
def test_damaged_byte_offset_counts_the_byte_order_mark(tmp_path, encoding, bad, expected):
    """The bad byte after a BOM and "abc" is byte 6 of the file, in the first chunk as past it
    (utf-8-sig's decoder counted from after the mark: 3 bytes short), and the error names the
    codec as the user declared it, not utf-8-sig."""
    from pipeline.data.sources import SNIFF_BYTES, read_text_unit

    for name, start in (("first.txt", b"abc"), ("later.txt", b"a" * SNIFF_BYTES + b"abc")):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + start + bad + b"def\n")
        at = 3 + len(start)
        with pytest.raises(DataSourceError, match=rf"^{tmp_path}/{name}: {expected.format(at=at)}"):
            list(read_text_unit(str(tmp_path / name), encoding=encoding))
