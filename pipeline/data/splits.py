"""Stable split assignment, exact de-duplication, and the check that every split got examples.

`assign_split` maps a content hash and `data.split.seed` alone to a split, so changing the
top-level `seed` (to train again with another initialisation) scores the run on the same test
set, and adding data never moves an old example, with one exception: a text near-duplicate
cluster takes the split of one member (`text.merge`: the smallest hash), so adding a
near-duplicate of an old document can move the old members of its cluster, test to train or
back. No cluster rule avoids it while keeping clusters in one split; the statistics count the
documents placed by their cluster rather than their own hash (`documents_split_by_cluster`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from pipeline.config.schema import SplitConfig

SPLITS = ("train", "val", "test")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assign_split(digest: str, split: SplitConfig) -> str:
    """Map a content hash to a split with the configured fractions, keyed by `split.seed`: its
    own key, not the top-level `seed`, because runs that differ only in their training seed
    must be scored on the same test set."""
    u = int(hashlib.sha256(f"{split.seed}:{digest}".encode()).hexdigest()[:15], 16) / 16**15
    if u < split.train:
        return "train"
    if u < split.train + split.val:
        return "val"
    return "test"


def check_splits(counts: Mapping[str, int], key: str, what: str = "examples") -> None:
    """Refuse a prepared data set with an empty split, in one line naming the config key
    (e.g. `tasks.lm.data.split`) and the count per split.

    Prepare is where this is known and explained: an empty val or test split otherwise passes
    prepare and shard and fails later, in training's validation or in evaluation, with a hint
    about shards that does not say why. `counts` maps each of `SPLITS` to its examples."""
    empty = [s for s in SPLITS if not counts.get(s)]
    if empty:
        have = ", ".join(f"{counts.get(s, 0)} {s}" for s in SPLITS)
        raise ValueError(f"{key}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
                         f"({have} {what}): use more data or larger fractions for {' and '.join(empty)}")


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
