"""Stable split assignment and exact de-duplication.

An example's split is a function of its content hash alone, so adding data never moves an
old example from train to test.
"""

from __future__ import annotations

import hashlib

from pipeline.config.schema import SplitConfig

SPLITS = ("train", "val", "test")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assign_split(digest: str, split: SplitConfig, seed: int) -> str:
    """Map a content hash to a split with the configured fractions."""
    u = int(hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()[:15], 16) / 16**15
    if u < split.train:
        return "train"
    if u < split.train + split.val:
        return "val"
    return "test"


class Deduper:
    """Remembers content hashes; `seen` is true for every repeat after the first."""

    def __init__(self) -> None:
        self._hashes: set[str] = set()
        self.duplicates = 0

    def seen(self, digest: str) -> bool:
        if digest in self._hashes:
            self.duplicates += 1
            return True
        self._hashes.add(digest)
        return False
