"""Deterministic, resumable, rank-partitioned batches.

The global sample order is a seeded permutation per epoch, independent of the number of
workers: global batch k is positions [k*B, (k+1)*B) of the concatenated epoch permutations,
and rank r of W takes the r-th contiguous slice of it. The only state is `position` (samples
consumed globally), saved in every checkpoint, so a resumed run sees exactly the samples an
uninterrupted one would have seen next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GlobalOrderReader:
    arrays: dict[str, np.ndarray]
    global_batch: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        self.n = len(next(iter(self.arrays.values())))
        if self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {self.world} workers")
        if self.n < self.global_batch:
            raise ValueError(f"the split has {self.n} samples, fewer than one global batch ({self.global_batch})")
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, position: int, count: int) -> np.ndarray:
        """Sample indices at global stream positions [position, position + count)."""
        pos = np.arange(position, position + count)
        epochs = pos // self.n
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._perm_for(int(e))[pos[mask] % self.n]
        return out

    def next_local_batch(self) -> dict[str, np.ndarray]:
        """This rank's slice of the next global batch; advances the position by one global batch."""
        local = self.global_batch // self.world
        idx = self.global_indices(self.position + self.rank * local, local)
        self.position += self.global_batch
        return {k: v[idx] for k, v in self.arrays.items()}

    @property
    def epoch(self) -> float:
        return self.position / self.n

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["global_batch"] != self.global_batch or state["seed"] != self.seed:
            raise ValueError("checkpoint was written with another global batch or seed; the data order would differ")
        self.position = int(state["position"])
