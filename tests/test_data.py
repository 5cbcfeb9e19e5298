"""Sources and prepare: cleaning, dedupe, stable splits, text and image sources, augmentation, balance."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import AugmentConfig, ImageDataConfig, SplitConfig, TextDataConfig
from pipeline.data.build import prepare
from pipeline.data.image_sources import read_images
from pipeline.data.images import augment, prepare_images
from pipeline.data.shard_store import read_split
from pipeline.data.sources import DataSourceError, read_text_documents
from pipeline.data.splits import assign_split, content_hash
from pipeline.data.text import clean_text


def test_clean_text_normalises_unicode_and_trailing_blanks():
    """NFC, a control character as a space, no trailing blanks; blanks inside a line stay as written
    (tests/test_text_cleaning.py has the characters and indentation cleaning must keep)."""
    assert clean_text("Cafe\u0301  bar\t\tbaz \x07\n\nnext  ") == "Café  bar\t\tbaz\n\nnext"


def test_prepare_text_drops_short_and_duplicate_documents(tmp_path):
    docs = ["A paragraph long enough to keep.", "A paragraph long enough to keep.", "short",
            *[f"Another distinct paragraph number {i} here." for i in range(30)]]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:20]))
    (tmp_path / "b.txt").write_text("\n\n".join([docs[0], *docs[20:]]))  # a repeat across files too
    stats = prepare(TextDataConfig(source=str(tmp_path), min_chars=10, vocab_size=300), 1, tmp_path / "out")
    assert stats["dropped_duplicates"] == 2 and stats["dropped_short"] == 1 and stats["documents_raw"] == 34
    kept = [d for s in ("train", "val", "test")
            for d in pq.read_table(tmp_path / "out" / f"{s}.parquet")["text"].to_pylist()]
    assert len(kept) == len(set(kept)) == 31
    assert sum(stats[f"documents_{s}"] for s in ("train", "val", "test")) == 31


def test_near_duplicates_are_dropped_when_asked(tmp_path):
    """Paragraphs that differ in one word of 60 are near-duplicates; unrelated ones are not."""
    from pipeline.data.synthetic import _words

    rng = np.random.default_rng(0)
    vocab = _words()
    originals = [" ".join(rng.choice(vocab, 60)) for _ in range(40)]
    edited = [" ".join([*d.split()[:30], "CHANGED", *d.split()[31:]]) for d in originals[:10]]
    (tmp_path / "docs.txt").write_text("\n\n".join(originals + edited))
    kept = {}
    for mode in ("keep", "drop"):
        cfg = TextDataConfig(source=str(tmp_path / "docs.txt"), near_duplicates=mode, vocab_size=300)
        stats = prepare(cfg, 0, tmp_path / mode)
        kept[mode] = sum(stats[f"documents_{s}"] for s in ("train", "val", "test"))
        assert stats["dropped_duplicates"] == 0
    assert kept == {"keep": 50, "drop": 40}


def test_split_assignment_is_stable_when_data_grows():
    cfg = SplitConfig()
    old = {f"doc {i}": assign_split(content_hash(f"doc {i}".encode()), cfg) for i in range(200)}
    grown = {f"doc {i}": assign_split(content_hash(f"doc {i}".encode()), cfg) for i in range(400)}
    assert all(grown[k] == v for k, v in old.items())
    counts = {s: list(grown.values()).count(s) for s in ("train", "val", "test")}
    assert counts["train"] > 250 and counts["val"] > 15 and counts["test"] > 15


def test_text_sources_read_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "from jsonl"}) + "\n")
    docs = list(read_text_documents(str(tmp_path), text_field="body"))
    assert docs == ["first paragraph", "second paragraph", "from jsonl"]
    with pytest.raises(DataSourceError, match="no field 'text'"):
        list(read_text_documents(str(tmp_path / "b.jsonl")))
    with pytest.raises(DataSourceError, match="does not exist"):
        list(read_text_documents(str(tmp_path / "missing")))


def test_parquet_text_source_streams_batches_and_names_a_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"document number {i}" for i in range(3000)]
    pq.write_table(pa.table({"id": list(range(3000)), "body": rows}), tmp_path / "part-0.parquet", row_group_size=500)
    assert list(read_text_documents(str(tmp_path), text_field="body")) == rows
    with pytest.raises(DataSourceError, match=r"no column 'text' \(data.text_field; columns: id, body\)"):
        list(read_text_documents(str(tmp_path / "part-0.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataSourceError, match=r"bad\.parquet: not a readable Parquet file"):
        list(read_text_documents(str(tmp_path), text_field="body"))


def test_hugging_face_saved_dataset_source(tmp_path):
    """A real `datasets` save_to_disk, read back with pyarrow (the pipeline needs no `datasets`)."""
    datasets = pytest.importorskip("datasets")

    train = datasets.Dataset.from_dict({"content": ["alpha text", "beta text"], "label": [0, 1]})
    test = datasets.Dataset.from_dict({"content": ["gamma text"], "label": [1]})
    train.save_to_disk(str(tmp_path / "one"))
    assert list(read_text_documents(str(tmp_path / "one"), text_field="content")) == ["alpha text", "beta text"]
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    assert list(read_text_documents(str(tmp_path / "both"), text_field="content")) == [
        "alpha text", "beta text", "gamma text"]
    with pytest.raises(DataSourceError, match="no column 'text'"):
        list(read_text_documents(str(tmp_path / "one")))


def test_hugging_face_saved_dataset_with_damaged_metadata_is_named(tmp_path):
    """A save_to_disk folder whose state.json or dataset_dict.json is cut short, not JSON, or lacks
    its list is one line naming the file (a bare JSONDecodeError or KeyError('_data_files') before)."""
    datasets = pytest.importorskip("datasets")

    train = datasets.Dataset.from_dict({"text": ["alpha text", "beta text"]})
    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "both"))
    state, listing = tmp_path / "both" / "train" / "state.json", tmp_path / "both" / "dataset_dict.json"
    good_state, good_listing = state.read_text(), listing.read_text()
    for file, text, expected in [
        (state, good_state[: len(good_state) // 2], r"state\.json: not a datasets save_to_disk metadata file \("),
        (state, '{"_fingerprint": "x"}', r"state\.json: no '_data_files' list in it, as datasets' save_to_disk"),
        (state, '{"_data_files": [{"name": "x"}]}', r"state\.json: a _data_files entry without a filename"),
        (state, "[1, 2]", r"state\.json: not a datasets save_to_disk metadata file"),
        (listing, '{"splits": "train"}', r"dataset_dict\.json: no 'splits' list in it"),
    ]:
        state.write_text(good_state)
        listing.write_text(good_listing)
        file.write_text(text)
        with pytest.raises(DataSourceError, match=rf"^{file}: .*" + expected.split(": ", 1)[1]):
            list(read_text_documents(str(tmp_path / "both")))
    state.write_text(good_state)
    listing.write_text(good_listing)
    assert list(read_text_documents(str(tmp_path / "both"))) == ["alpha text", "beta text"]


def test_text_file_suffixes_are_read_in_any_case_and_another_kind_of_file_is_named(tmp_path):
    """NOTES.TXT and records.JSONL in a folder are read (they were skipped without a word), a single
    DATA.PARQUET is read as Parquet (it was read as text and refused as binary), and a single file
    prepare does not read by its name (train.json holding JSON Lines) is refused naming it (it was
    trained on as plain text, its JSON syntax included)."""
    from pathlib import Path

    import pyarrow as pa

    from pipeline.data.sources import text_units

    src = tmp_path / "src"
    src.mkdir()
    (src / "NOTES.TXT").write_text("upper case notes")
    (src / "records.JSONL").write_text('{"text": "a record"}\n')
    (src / "picture.png").write_bytes(b"\x89PNG")
    assert [Path(u).name for u in text_units(str(src))] == ["NOTES.TXT", "records.JSONL"]
    assert list(read_text_documents(str(src))) == ["upper case notes", "a record"]
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "DATA.PARQUET")
    assert list(read_text_documents(str(tmp_path / "DATA.PARQUET"))) == ["from parquet"]
    (tmp_path / "train.json").write_text('{"id": 0, "text": "a document"}\n')
    with pytest.raises(DataSourceError, match=rf"^data\.source: '{tmp_path}/train\.json' is not a "
                                              r"\.txt/\.md/\.rst/\.jsonl/\.parquet file"):
        text_units(str(tmp_path / "train.json"))


def test_a_declared_utf8_file_loses_its_byte_order_mark(tmp_path):
    """data.encoding=utf-8 on a file written with a BOM: the first document does not start with an
    invisible U+FEFF (which also kept it from matching its copy in de-duplication), as with auto."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello world, first paragraph.\n\nSecond.\n")
    for encoding in ("utf-8", "UTF8", "auto"):
        assert list(read_text_documents(str(tmp_path / "bom.txt"), encoding=encoding)) == [
            "Hello world, first paragraph.", "Second."], encoding


def test_builtin_text_is_real_prose():
    docs = list(read_text_documents("builtin:python-docs"))
    assert len(docs) > 5000
    assert any("Assert statements are a convenient way" in d for d in docs)


def test_image_sources_npz_and_builtin(tmp_path):
    x, y, n = read_images("builtin:digits")
    assert x.shape == (1797, 1, 8, 8) and n == 10 and x.min() >= 0 and x.max() <= 1
    np.savez(tmp_path / "mine.npz", images=(x[:20, 0] * 255).astype(np.uint8), labels=y[:20])
    x2, y2, _ = read_images(str(tmp_path / "mine.npz"))
    assert x2.shape == (20, 1, 8, 8) and x2.max() <= 1.0 and (y2 == y[:20]).all()


def test_augmentation_is_seeded_label_preserving_and_in_range():
    x, y, _ = read_images("builtin:digits")
    cfg = AugmentConfig(copies=2)
    a1, a2 = augment(x[:10], cfg, seed=3), augment(x[:10], cfg, seed=3)
    assert a1.shape == (20, 1, 8, 8) and np.array_equal(a1, a2)
    assert a1.min() >= 0.0 and a1.max() <= 1.0
    assert not np.allclose(a1[:10], x[:10])  # it changed the pixels
    splits, stats = prepare_images(x, y, ImageDataConfig(augment=cfg), seed=0)
    assert stats["images_train"] == 3 * sum(stats["class_counts_train"]) // 3
    tx, ty = splits["train"]
    assert tx.min() >= -1 and tx.max() <= 1 and len(tx) == len(ty)


def test_colour_class_folders_and_colour_jitter(tmp_path):
    """PNG class folders in colour stay 3-channel; colour jitter changes channels differently."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    x, y, n = read_images(str(tmp_path))
    assert x.shape == (6, 3, 6, 6) and n == 2 and y.tolist() == [0, 0, 0, 1, 1, 1]
    still = augment(x, AugmentConfig(copies=1, rotate_deg=0, shift_px=0, noise_std=0), seed=1)
    jittered = augment(x, AugmentConfig(copies=1, rotate_deg=0, shift_px=0, noise_std=0, color_jitter=0.4), seed=1)
    assert np.allclose(still, x, atol=1e-6) and not np.allclose(jittered, x, atol=1e-3)
    assert jittered.min() >= 0 and jittered.max() <= 1


@pytest.mark.parametrize("balance", ["oversample", "weights"])
def test_class_balance(balance, tmp_path):
    """An imbalanced set: oversampling evens the training classes; weights leave the data as it
    is and give each class the same total weight (a `weight` column in the train shards)."""
    from pipeline.data.build import shard
    from pipeline.data.images import class_weights

    x, y, _ = read_images("builtin:digits")
    keep = np.flatnonzero((y != 3) | (np.arange(len(y)) % 6 == 0))  # digit 3 is rare
    np.savez(tmp_path / "rare3.npz", images=x[keep, 0], labels=y[keep])
    cfg = ImageDataConfig(source=str(tmp_path / "rare3.npz"), balance=balance, augment=AugmentConfig(copies=0))
    stats = prepare(cfg, 0, tmp_path / "prepared")
    before, after = stats["class_counts_train_before_balance"], stats["class_counts_train"]
    assert before[3] < min(before[:3] + before[4:]) // 3
    if balance == "oversample":
        assert len(set(after)) == 1 and after[0] == max(before)
    else:
        assert after == before
        shard(cfg, tmp_path / "prepared", tmp_path / "shards")
        train = read_split(tmp_path / "shards", "train")
        totals = np.bincount(train["label"], weights=train["weight"])
        assert np.allclose(totals, totals[0], rtol=1e-4) and abs(train["weight"].mean() - 1) < 1e-5
        assert "weight" not in read_split(tmp_path / "shards", "val")
        assert np.allclose(class_weights(np.array([0, 0, 0, 1]), 3), [2 / 3, 2 / 3, 2 / 3, 2.0])
