"""The global-order reader: the same sample order at any worker count, exact resume, windowed shuffling."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.reader import GlobalOrderReader
from pipeline.data.shard_store import ShardSet
from tests.test_shards import _many_shards


def _arrays(n=40):
    return {"id": np.arange(n), "x": np.arange(n) * 10}


def test_global_order_does_not_depend_on_worker_count():
    one = GlobalOrderReader(_arrays(), global_batch=8, seed=5)
    two = [GlobalOrderReader(_arrays(), global_batch=8, rank=r, world=2, seed=5) for r in range(2)]
    for _ in range(12):  # crosses epoch boundaries (40 samples / 8)
        ref = one.next_local_batch()["id"]
        got = np.concatenate([r.next_local_batch()["id"] for r in two])
        assert np.array_equal(ref, got)


def test_reader_resumes_exactly():
    straight = GlobalOrderReader(_arrays(), global_batch=8, seed=5)
    seen = [straight.next_local_batch()["id"] for _ in range(9)]
    first = GlobalOrderReader(_arrays(), global_batch=8, seed=5)
    for _ in range(4):
        first.next_local_batch()
    resumed = GlobalOrderReader(_arrays(), global_batch=8, seed=5)
    resumed.load_state_dict(first.state_dict())
    rest = [resumed.next_local_batch()["id"] for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(seen[4:], rest, strict=True))
    each_epoch = np.concatenate(seen[:5])
    assert sorted(each_epoch.tolist()) == list(range(40))  # an epoch is a permutation: none lost or repeated


def test_reader_moved_back_to_an_earlier_epoch_reads_it_again():
    """A reader that has read into epoch 2 and is set back to epoch 0 (`load_state_dict` of an
    earlier position) reads epoch 0's batches again; it evicted the plan it had just made (KeyError)."""
    reader = GlobalOrderReader(_arrays(10), global_batch=5, seed=1)
    start = reader.state_dict()
    first = [reader.next_local_batch()["id"] for _ in range(6)]  # epochs 0, 1 and 2
    reader.load_state_dict(start)
    again = [reader.next_local_batch()["id"] for _ in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_reader_refuses_a_checkpoint_of_other_data():
    """A position in 40 rows means nothing in 48 (the data were re-sharded or grew): refused by name
    (a loop resumed by hand on other shards followed another order without a word)."""
    first = GlobalOrderReader(_arrays(40), global_batch=8, seed=5)
    first.next_local_batch()
    with pytest.raises(ValueError, match=r"written reading 40 rows in 1 shards, this split has 48 in 1"):
        GlobalOrderReader(_arrays(48), global_batch=8, seed=5).load_state_dict(first.state_dict())
    older = {k: v for k, v in first.state_dict().items() if k not in ("rows", "shards")}  # checkpoints from before
    GlobalOrderReader(_arrays(40), global_batch=8, seed=5).load_state_dict(older)


def test_reader_refuses_a_different_global_batch():
    r = GlobalOrderReader(_arrays(), global_batch=8)
    with pytest.raises(ValueError, match="global batch"):
        GlobalOrderReader(_arrays(), global_batch=4).load_state_dict(r.state_dict())


def test_windowed_order_does_not_depend_on_worker_count(tmp_path):
    """13 shards shuffled in windows of 4: 1, 2 and 4 workers (with prefetch) see one order."""
    one = GlobalOrderReader(_many_shards(tmp_path / "s"), global_batch=8, seed=3, window=4)
    many = {w: [GlobalOrderReader(ShardSet(tmp_path / "s", "train"), global_batch=8, rank=r, world=w, seed=3,
                                  window=4, prefetch=2) for r in range(w)] for w in (2, 4)}
    seen = []
    for _ in range(50):  # two epochs of 25 batches
        ref = one.next_local_batch()
        assert np.array_equal(ref["x"], ref["id"] * 10)  # rows stay whole
        for readers in many.values():
            assert np.array_equal(ref["id"], np.concatenate([r.next_local_batch()["id"] for r in readers]))
        seen.append(ref["id"])
        assert len(one._decoded) <= 2  # memory: the current and the previous window of decoded rows
    epochs = np.concatenate(seen).reshape(2, 200)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(200))  # each epoch: all, once
    assert not np.array_equal(epochs[0], epochs[1])  # and a new order every epoch
    first_window = set(epochs[0][:48] // 16)  # rows early in the epoch all come from the first window
    assert len(first_window) == 4
    for readers in many.values():
        for r in readers:
            r.close()


def test_streaming_reader_resumes_mid_epoch_exactly(tmp_path):
    """Stop after 17 batches (mid-epoch, mid-window), resume from the saved state with another
    worker count: the samples are exactly those an uninterrupted run sees next."""
    shards = _many_shards(tmp_path / "s")
    straight = GlobalOrderReader(shards, global_batch=8, seed=3, window=4, prefetch=2)
    expected = [straight.next_local_batch()["id"] for _ in range(40)]
    first = GlobalOrderReader(shards, global_batch=8, rank=0, world=2, seed=3, window=4, prefetch=3)
    for _ in range(17):
        first.next_local_batch()  # prefetch has decoded batches beyond 17; they must not count
    state = first.state_dict()
    resumed = [GlobalOrderReader(ShardSet(tmp_path / "s", "train"), global_batch=8, rank=r, world=4, seed=3,
                                 window=4, prefetch=2) for r in range(4)]
    for r in resumed:
        r.load_state_dict(state)
    rest = [np.concatenate([r.next_local_batch()["id"] for r in resumed]) for _ in range(23)]
    assert all(np.array_equal(a, b) for a, b in zip(expected[17:], rest, strict=True))
    with pytest.raises(ValueError, match="shuffle window"):
        GlobalOrderReader(shards, global_batch=8, seed=3, window=2).load_state_dict(state)
