"""Deterministic, resumable, rank-partitioned batches streamed from verified shards.

Order. The global sample order is a seeded function of the epoch, independent of the number
of workers. For epoch e the shards are permuted, grouped into windows of `window` shards, and
the rows of each window permuted; the epoch is those windows one after another. Global batch
k is positions [k*B, (k+1)*B) of the concatenated epochs, and rank r of W takes the r-th
contiguous slice of it, so ranks consume disjoint samples and a constant global batch sees
the same samples at any W. With `window` >= the number of shards (or 0) this is an exact
global shuffle; a smaller window bounds memory to two windows of decoded rows per rank (the
one being read and the one before, for a batch that straddles them), the shuffle-buffer
trade-off that MDS and WebDataset make too. A batch inside one window is one gather.

State. The only state is `position` (samples consumed globally), saved in every checkpoint, so
a resumed run sees exactly the samples an uninterrupted one would have seen next.

Overlap. With `prefetch` > 0 a background thread assembles the next batches while the model
computes, and whenever a window is loaded the kernel is asked to read the next window's files
ahead (posix_fadvise WILLNEED). What is computed ahead is a pure function of the position,
so prefetching never changes the order or the resume point.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Shards(Protocol):
    """What the reader needs from a split: rows per shard, and several shards' rows concatenated."""

    rows: np.ndarray

    def load_many(self, indices: Iterable[int], spare: dict[str, np.ndarray] | None = None
                  ) -> dict[str, np.ndarray]: ...


class InMemoryShards:
    """Arrays already in memory, as one shard (tests, small evaluation sets)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.rows = np.array([len(next(iter(arrays.values())))])

    def load_many(self, indices: Iterable[int], spare: dict[str, np.ndarray] | None = None
                  ) -> dict[str, np.ndarray]:
        return self.arrays


@dataclass
class GlobalOrderReader:
    data: Shards | dict[str, np.ndarray]
    global_batch: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    position: int = 0
    window: int = 0  # shards per shuffle window; 0 = all (exact global shuffle)
    prefetch: int = 0  # batches decoded ahead in a background thread
    _decoded: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = InMemoryShards(self.data)
        self.rows = np.asarray(self.data.rows, dtype=np.int64)
        self.n = int(self.rows.sum())
        if self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {self.world} workers")
        if self.n < self.global_batch:
            raise ValueError(f"the split has {self.n} samples, fewer than one global batch ({self.global_batch})")
        self.shards_per_window = len(self.rows) if self.window <= 0 else min(self.window, len(self.rows))
        self._plans: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}
        self._perm_key: tuple[int, int] | None = None
        self._perm = np.empty(0, dtype=np.int64)
        self._producer: threading.Thread | None = None

    # ------------------------------------------------------------------ the order
    def _plan(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Windows of shard indices for the epoch, and each window's first global offset."""
        if epoch not in self._plans:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            windows = [order[i:i + self.shards_per_window] for i in range(0, len(order), self.shards_per_window)]
            starts = np.cumsum([0] + [int(self.rows[w].sum()) for w in windows])
            self._plans[epoch] = (windows, starts)
            while len(self._plans) > 2:  # this epoch and the next (read-ahead looks into it); never the
                # one asked for, which is the oldest when a reader goes back to an earlier position
                self._plans.pop(min(e for e in self._plans if e != epoch))
        return self._plans[epoch]

    def _window_perm(self, epoch: int, w: int, size: int) -> np.ndarray:
        if self._perm_key != (epoch, w):
            self._perm = np.random.default_rng([self.seed, epoch, w + 1]).permutation(size)
            self._perm_key = (epoch, w)
        return self._perm

    def _where(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, window, row within the window) of global stream positions [position, position + count)."""
        pos = np.arange(position, position + count)
        epochs, offsets = pos // self.n, pos % self.n
        win, j = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            _, starts = self._plan(int(e))
            sel = np.flatnonzero(epochs == e)
            w_of = np.searchsorted(starts, offsets[sel], side="right") - 1
            for w in np.unique(w_of):
                part = sel[w_of == w]
                perm = self._window_perm(int(e), int(w), int(starts[w + 1] - starts[w]))
                win[part], j[part] = w, perm[offsets[part] - starts[w]]
        return epochs, win, j

    def locate(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of the samples at global stream positions [position, position + count)."""
        epochs, win, j = self._where(position, count)
        shard, row = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        for e, w in {(int(a), int(b)) for a, b in zip(epochs, win, strict=True)}:
            sel = (epochs == e) & (win == w)
            members = self._plan(e)[0][w]
            bounds = np.cumsum(np.concatenate([[0], self.rows[members]]))
            k = np.searchsorted(bounds, j[sel], side="right") - 1
            shard[sel], row[sel] = members[k], j[sel] - bounds[k]
        return shard, row

    def global_ids(self, position: int, count: int) -> np.ndarray:
        """Split-wide row numbers of the samples at those positions (for tests and audits)."""
        shard, row = self.locate(position, count)
        return np.concatenate([[0], np.cumsum(self.rows)])[shard] + row

    # ------------------------------------------------------------------ batches
    def _window_rows(self, epoch: int, w: int) -> dict[str, np.ndarray]:
        """The decoded rows of one window, its shards concatenated in window order. The current
        and the previous window are kept (a batch may straddle them): memory is two windows."""
        key = (epoch, w)
        if key not in self._decoded:
            # The evicted window's buffers are reused: no fresh pages to fault in per window.
            spare = self._decoded.popitem(last=False)[1] if len(self._decoded) >= 2 else None
            self._decoded[key] = self.data.load_many(self._plan(epoch)[0][w], spare)
            if hasattr(self.data, "advise"):  # the kernel reads the next window while this one is used
                windows = self._plan(epoch)[0]
                self.data.advise(windows[w + 1] if w + 1 < len(windows) else self._plan(epoch + 1)[0][0])
        return self._decoded[key]

    def _batch_at(self, position: int) -> dict[str, np.ndarray]:
        local = self.global_batch // self.world
        start = position + self.rank * local
        e, off = divmod(start, self.n)
        starts = self._plan(e)[1]
        w = int(np.searchsorted(starts, off, side="right")) - 1
        if off + local <= starts[w + 1]:  # the common case: inside one window, one gather per column
            first = off - int(starts[w])
            j = self._window_perm(e, w, int(starts[w + 1] - starts[w]))[first:first + local]
            return {k: v[j] for k, v in self._window_rows(e, w).items()}
        epochs, win, j = self._where(start, local)
        out: dict[str, np.ndarray] = {}
        for e, w in dict.fromkeys(zip(epochs.tolist(), win.tolist(), strict=True)):
            sel = (epochs == e) & (win == w)
            for name, col in self._window_rows(e, w).items():
                if name not in out:
                    out[name] = np.empty((local, *col.shape[1:]), dtype=col.dtype)
                out[name][sel] = col[j[sel]]
        return out

    def next_local_batch(self) -> dict[str, np.ndarray]:
        """This rank's slice of the next global batch; advances the position by one global batch."""
        if self.prefetch <= 0:
            batch = self._batch_at(self.position)
        else:
            if self._producer is None:
                self._start_producer()
            ahead, batch, error = self._queue.get()
            if error is not None:
                self._drop_prefetched()
                raise error
            assert ahead == self.position, (ahead, self.position)
        self.position += self.global_batch
        return batch

    def _start_producer(self) -> None:
        """One thread computes batches from the current position on, `prefetch` ahead at most.
        Only this thread touches the decoded windows while it runs."""
        stop, q, position = threading.Event(), queue.Queue(self.prefetch), self.position

        def produce() -> None:
            pos = position
            while not stop.is_set():
                try:
                    item = (pos, self._batch_at(pos), None)
                except BaseException as e:  # handed to the consumer, raised there
                    item = (pos, None, e)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[2] is not None:
                    return
                pos += self.global_batch

        self._stop, self._queue = stop, q
        self._producer = threading.Thread(target=produce, name="reader-prefetch", daemon=True)
        self._producer.start()

    def _drop_prefetched(self) -> None:
        if self._producer is not None:
            self._stop.set()
            self._producer.join()
            self._producer = None

    def close(self) -> None:
        self._drop_prefetched()

    @property
    def epoch(self) -> float:
        return self.position / self.n

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "global_batch": self.global_batch,
                "window": self.shards_per_window, "rows": self.n, "shards": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["global_batch"] != self.global_batch or state["seed"] != self.seed:
            raise ValueError("checkpoint was written with another global batch or seed; the data order would differ")
        if (state.get("rows", self.n), state.get("shards", len(self.rows))) != (self.n, len(self.rows)):
            raise ValueError(f"checkpoint was written reading {state.get('rows')} rows in {state.get('shards')} "
                             f"shards, this split has {self.n} in {len(self.rows)}; the data order would differ "
                             "(the data changed since: train anew)")
        if state.get("window", self.shards_per_window) != self.shards_per_window:
            raise ValueError(f"checkpoint was written with a shuffle window of {state['window']} shards, this run "
                             f"uses {self.shards_per_window}; the data order would differ")
        self._drop_prefetched()
        self.position = int(state["position"])
