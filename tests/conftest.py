"""Shared fixtures: a tiny validated config and small real data sets on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import compose, validate
from pipeline.config.loading import apply_overrides

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "tasks.lm.data.vocab_size=300", "tasks.lm.data.seq_len=32", "tasks.lm.data.shard_rows=64",
    "tasks.lm.trainer.max_steps=6", "tasks.lm.trainer.global_batch_size=8", "tasks.lm.trainer.log_every=2",
    "tasks.lm.trainer.ckpt_every=3", "tasks.lm.optim.warmup_steps=2", "tasks.lm.eval.max_batches=2",
    "tasks.lm.eval.batch_size=8",
    "tasks.diffusion.data.augment.copies=1", "tasks.diffusion.data.shard_rows=256",
    "tasks.diffusion.trainer.max_steps=6", "tasks.diffusion.trainer.global_batch_size=16",
    "tasks.diffusion.trainer.log_every=2", "tasks.diffusion.trainer.ckpt_every=3",
    "tasks.diffusion.optim.warmup_steps=2", "tasks.diffusion.eval.max_batches=1",
    "tasks.diffusion.eval.batch_size=16", "tasks.diffusion.eval.sample_cols=2",
    "tasks.diffusion.model.diffusion.sample_steps=4",
]
TINY_GROUPS = ["model@tasks.lm.model=gpt_tiny", "model@tasks.diffusion.model=dit_tiny"]


def tiny_raw(extra: list[str] | None = None) -> dict:
    raw = compose(ROOT / "configs", TINY_GROUPS)
    return apply_overrides(raw, TINY + (extra or []))


@pytest.fixture
def tiny_cfg():
    return validate(tiny_raw())


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A small real-text folder: paragraphs of CPython's Language Reference, plus one repeat."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("corpus")
    names = sorted(topics)[:12]
    for n in names:
        (d / f"{n}.txt").write_text(topics[n])
    (d / "repeat.txt").write_text(topics[names[0]])  # exact duplicates to be dropped
    return d


@pytest.fixture(scope="session")
def built_data(tmp_path_factory, text_corpus):
    """Prepared and sharded tiny data for both tasks (real digits, real text)."""
    from pipeline.data.build import prepare, shard

    cfg = validate(tiny_raw([f"tasks.lm.data.source={text_corpus}"]))
    root = tmp_path_factory.mktemp("data")
    out = {}
    for task in ("lm", "diffusion"):
        prepare(cfg.task(task).data, cfg.seed, root / task / "prepared")
        shard(cfg.task(task).data, root / task / "prepared", root / task / "shards")
        out[task] = root / task / "shards"
    return cfg, out
