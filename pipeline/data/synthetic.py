"""A text corpus of any size made of real words, for scale tests and data benchmarks.

Words come from the bundled Python documentation, so tokenizer training and packing see a
realistic vocabulary; every paragraph carries its own number, so none is an exact repeat and
de-duplication keeps them all.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def _words() -> np.ndarray:
    from pydoc_data.topics import topics

    words = re.findall(r"[A-Za-z][A-Za-z'-]*[.,;:]?", " ".join(topics[k] for k in sorted(topics)))
    return np.array(sorted(set(words)))


def write_corpus(path: Path, size_bytes: int, seed: int = 0, words_per_paragraph: int = 80) -> int:
    """Write about `size_bytes` of blank-line separated paragraphs to `path`; returns the number
    of paragraphs. Memory stays at one block of paragraphs whatever the size."""
    rng = np.random.default_rng(seed)
    vocab = _words().tolist()  # Python strings: joining numpy string scalars is several times slower
    written = paragraphs = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        while written < size_bytes:
            block = rng.integers(0, len(vocab), size=(2000, words_per_paragraph)).tolist()
            text = "".join(f"Paragraph {paragraphs + i}: {' '.join(map(vocab.__getitem__, row))}\n\n"
                           for i, row in enumerate(block))
            fh.write(text)
            written += len(text.encode("utf-8"))
            paragraphs += len(block)
    return paragraphs
