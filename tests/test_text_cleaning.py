"""Text prepare keeps what it reads: cleaning that loses no legitimate character or indentation,
near-duplicates that never straddle splits whatever the file order, a split seed of its own,
lone surrogates, special tokens inside documents, and empty held-out splits refused."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config.schema import SplitConfig, TextDataConfig
from pipeline.data.build import prepare
from pipeline.data.sources import text_units
from pipeline.data.splits import SPLITS, assign_split, check_splits, content_hash
from pipeline.data.text import (
    EOS,
    clean_text,
    clean_unit,
    encode,
    iter_documents,
    merge,
    minhash_bands,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


def _merge(source: Path, out: Path, seed: int = 0, **cfg) -> tuple[dict, dict[str, str]]:
    """Prepare's map and merge (no tokenizer): its statistics and each kept document's split."""
    config = TextDataConfig(source=str(source), min_chars=5, **cfg)
    out.mkdir(parents=True)
    stats = merge((x for u in text_units(str(source)) for x in clean_unit((u, config, seed))), out)
    return stats, {d: s for s in SPLITS for batch in iter_documents(out / f"{s}.parquet") for d in batch}


def _paragraphs(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{k}" for k in rng.integers(0, 5000, words)) for _ in range(n)]


def _split(text: str, split: SplitConfig | None = None) -> str:
    return assign_split(content_hash(text.encode()), split or SplitConfig())


def _variant_in_another_split(original: str) -> str:
    """A near-duplicate of `original` (one word of 60 changed, sharing a MinHash band) whose own
    hash would put it in another split than the original's."""
    words = original.split()
    for k in range(1000):
        variant = " ".join([*words[:30], f"edit{k}", *words[31:]])
        if _split(variant) != _split(original) and set(minhash_bands(variant)) & set(minhash_bands(original)):
            return variant
    raise AssertionError("no near-duplicate in another split")


@pytest.mark.parametrize("text", [
    "family: \U0001F468\u200D\U0001F469\u200D\U0001F467 ok",  # emoji zero-width joiners
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian zero-width non-joiner
    "\u0915\u094d\u200d\u0937",  # Devanagari ZWJ
    "price \u200f\u202b\u05de\u05d7\u05d9\u05e8\u202c 10",  # bidi marks
    "hyphen\u00adation",  # soft hyphen
    "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F",  # flag tag sequence
    "private \ue000 use",
    "def f(x):\n    if x:\n        return 1\n\treturn 2",  # indentation, spaces and tabs
    "a    b    c\n1    2    3",  # an aligned table
])
def test_cleaning_keeps_legitimate_characters_and_indentation(text):
    assert clean_text(text) == text


def test_cleaning_keeps_code_points_this_python_does_not_know():
    """An unassigned code point (a newer emoji on an older Python) stays, so the prepared text
    does not depend on the Python version."""
    unassigned = "\U0003fffd"
    assert unicodedata.category(unassigned) == "Cn"
    assert clean_text(f"new emoji {unassigned} here") == f"new emoji {unassigned} here"


def test_cleaning_turns_control_characters_into_breaks_not_glue():
    assert clean_text("line one\rline two") == "line one\nline two"
    assert clean_text("dos\r\nline\x0cpage\x85next") == "dos\nline\npage\nnext"
    assert clean_text("a\x00b\x1fc\x7fd  \n\n") == "a b c d"


def test_lone_surrogate_is_dropped_counted_and_not_fatal(tmp_path):
    """A JSONL value with half an emoji (a truncating scraper's) loses that half, not the file."""
    docs = [*_paragraphs(30, words=12), "an emoji cut in half \ud83d by a scraper"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats, kept = _merge(tmp_path / "src", tmp_path / "out")
    assert stats["dropped_surrogates"] == 1 and stats["documents_raw"] == 31
    assert "an emoji cut in half  by a scraper" in kept


def test_copies_differing_in_surrounding_blanks_are_exact_duplicates(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in [
        *_paragraphs(20, words=12), "    New in version 3.10.", "New in version 3.10.  "]))
    stats, kept = _merge(tmp_path / "src", tmp_path / "out")
    assert stats["dropped_duplicates"] == 1 and len(kept) == 21


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_near_duplicates_share_one_split_whatever_the_file_order(tmp_path, mode):
    """A near-duplicate whose own hash would hold it out lands in its original's split; with
    `drop` the same member survives when the files are read in another order."""
    others = _paragraphs(40, seed=1)
    original = _paragraphs(1, seed=2)[0]
    variant = _variant_in_another_split(original)
    results = []
    for run, first in enumerate(("a", "z")):  # the variant's file sorts before, then after, the original's
        src = tmp_path / f"src{run}"
        src.mkdir()
        (src / "m.txt").write_text("\n\n".join([original, *others]))
        (src / f"{first}.txt").write_text(variant)
        results.append(_merge(src, tmp_path / f"out{run}", near_duplicates=mode))
    (stats, kept), (_, kept_reordered) = results
    if mode == "keep":
        assert kept[original] == kept[variant]
    else:
        assert len({original, variant} & set(kept)) == 1 and stats["dropped_near_duplicates"] == 1
    assert kept == kept_reordered and stats["near_duplicate_clusters"] == 1


def test_adding_a_near_duplicate_can_move_an_old_document_and_is_counted(tmp_path):
    """What the docstrings and README promise, no more: a document's split is its own hash's until
    a near-duplicate with a smaller hash joins it, which then carries it to its own split; the
    statistics count the documents placed by their cluster (`documents_split_by_cluster`)."""
    others = _paragraphs(40, seed=1)
    original = _paragraphs(1, seed=2)[0]
    words, variant = original.split(), None
    for k in range(3000):  # a near-duplicate in another split whose hash is the cluster's smallest
        candidate = " ".join([*words[:30], f"edit{k}", *words[31:]])
        if (_split(candidate) != _split(original) and content_hash(candidate.encode()) < content_hash(original.encode())
                and set(minhash_bands(candidate)) & set(minhash_bands(original))):
            variant = candidate
            break
    assert variant is not None
    (tmp_path / "old").mkdir()
    (tmp_path / "old/m.txt").write_text("\n\n".join([original, *others]))
    stats, kept = _merge(tmp_path / "old", tmp_path / "out_old")
    assert kept[original] == _split(original) and stats["documents_split_by_cluster"] == 0
    (tmp_path / "old/new.txt").write_text(variant)
    stats, kept = _merge(tmp_path / "old", tmp_path / "out_new")
    assert kept[original] == kept[variant] == _split(variant) != _split(original)  # the old document moved
    assert stats["documents_split_by_cluster"] == 1


def test_splits_follow_the_split_seed_not_the_training_seed(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("\n\n".join(_paragraphs(60, words=12)))
    _, one = _merge(tmp_path / "src", tmp_path / "one", seed=1)
    _, two = _merge(tmp_path / "src", tmp_path / "two", seed=2)
    _, other = _merge(tmp_path / "src", tmp_path / "other", seed=1, split=SplitConfig(seed=7))
    assert one == two and one != other
    assert SplitConfig().seed == 1337  # the top-level seed's default: configs before the key keep their splits
    assert all(one[d] == _split(d) for d in one)


def test_dvc_prepare_of_the_lm_does_not_depend_on_the_training_seed():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    params = {task: [p.replace("${key}", task).replace("${item.also}", item["also"]) for p in stages["do"]["params"]]
              for task, item in stages["foreach"].items()}
    assert "seed" not in params["lm"] and "tasks.lm.data" in params["lm"]
    assert "seed" in params["diffusion"]  # its augmentation is seeded


def test_empty_held_out_split_is_refused_in_prepare(tmp_path):
    """A corpus whose documents all hash to train or test: prepare stops, naming the key and
    the counts, instead of a shard or evaluation failure later."""
    docs = [d for d in _paragraphs(40, words=12) if _split(d) != "val"][:12]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("\n\n".join(docs))
    with pytest.raises(ValueError, match=r"^tasks\.lm\.data\.split: the val split is empty \(\d+ train, 0 val, "
                                         r"\d+ test documents\)") as err:
        prepare(TextDataConfig(source=str(tmp_path / "src"), min_chars=5, vocab_size=300), 0, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^tasks\.diffusion\.data\.split: the val and test splits are empty "
                                         r"\(5 train, 0 val, 0 test images\)"):
        check_splits({"train": 5, "val": 0, "test": 0}, "tasks.diffusion.data.split", "images")
    check_splits({"train": 5, "val": 1, "test": 1}, "tasks.lm.data.split")


def test_special_token_inside_a_document_is_text_not_a_boundary(tmp_path):
    docs = _paragraphs(50, words=20)
    pq.write_table(pa.table({"text": docs}), tmp_path / "train.parquet")
    train_tokenizer(tmp_path / "train.parquet", 300, tmp_path / "tokenizer.json", 10**6, sum(map(len, docs)))
    tokenizer_json = (tmp_path / "tokenizer.json").read_text()
    doc = f"GPT-2 writes {EOS} between documents."
    ids = encode(([doc, "next"], tokenizer_json, EOS))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    eos = tok.token_to_id(EOS)
    ends = [i for i, t in enumerate(ids) if t == eos]
    assert len(ends) == 2 and ends[1] == len(ids) - 1  # one separator after each document, none inside
    assert tok.decode(ids[:ends[0]].tolist(), skip_special_tokens=False) == doc
    assert re.fullmatch(r"next", tok.decode(ids[ends[0] + 1:-1].tolist()))
