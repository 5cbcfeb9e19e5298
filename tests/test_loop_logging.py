"""What the loop logs, in real in-process runs on the tiny config: a window in which every step
was skipped shows no loss (not 0.0, which made a diverging run look perfect), and the time a
validation takes is not charged to the training window's throughput and MFU."""

from __future__ import annotations

import math
import time

import pytest

from pipeline.config import validate
from pipeline.training.checkpoint import read_meta
from pipeline.training.loop import _eta, train
from pipeline.training.session import LocalSession
from tests.conftest import tiny_raw

# lr 1e30 wrecks the weights at step 1 (no warm-up): every later step has a non-finite loss and
# is skipped, well below the 20 in a row that stop the run; one report per step
DIVERGES = ["tasks.lm.optim.lr=1e30", "tasks.lm.optim.warmup_steps=0", "tasks.lm.trainer.log_every=1",
            "tasks.lm.trainer.max_steps=5", "tasks.lm.trainer.ckpt_every=5"]


def test_a_window_of_skipped_steps_logs_no_loss(built_data, text_corpus, tmp_path, capsys):
    """The windows of skipped steps carry NaN loss and grad norm in the history (what goes to
    MLflow, the CSV and the final checkpoint; the loss plot drops NaN), and the console says why;
    the good step before them logs its real loss."""
    _, shards = built_data
    cfg = validate(tiny_raw([f"tasks.lm.data.source={text_corpus}", *DIVERGES]))
    session = LocalSession(tmp_path)
    state = train(cfg, "lm", shards["lm"], session)

    assert [h["step"] for h in state.history] == [1, 2, 3, 4, 5]
    first, *skipped = state.history
    assert first["skipped_steps"] == 0 and math.isfinite(first["loss"]) and first["loss"] > 1
    assert math.isfinite(first["grad_norm"])
    assert [h["skipped_steps"] for h in skipped] == [1, 2, 3, 4]  # each window: its one step skipped
    for entry in skipped:
        assert math.isnan(entry["loss"]) and math.isnan(entry["grad_norm"]), entry
    assert state.skipped_steps == 4
    assert [r["step"] for r in session.reports] == [1, 2, 3, 4, 5] and math.isnan(session.reports[-1]["loss"])
    with session.latest_checkpoint() as ckpt:  # NaN survives the checkpoint's JSON and its digest
        assert math.isnan(read_meta(ckpt)["history"][-1]["loss"])

    lines = [line for line in capsys.readouterr().out.splitlines() if "| eta " in line]
    assert len(lines) == 5
    assert "| loss n/a" not in lines[0] and "| grad n/a" not in lines[0]
    for line in lines[1:]:
        assert "| loss n/a (all 1 steps skipped) |" in line and "| grad n/a |" in line, line
        assert "loss 0.0000" not in line


def test_validation_time_is_not_charged_to_the_training_window(built_data, text_corpus, tmp_path):
    """Step 2 validates on 300 global batches (on a CPU, the time of some 60 training steps).
    The seconds its window's throughput is computed over (tokens / tokens_per_s; MFU and the
    data-wait share use the same) must be a small part of the wall time between the step-1 and
    step-2 reports, which holds the validation. Compared within one run, and with a 2x margin
    where the fix makes a 60x difference, so a busy machine does not flip it: before the fix the
    window was that whole gap (validation included); after it, one training step."""
    _, shards = built_data
    cfg = validate(tiny_raw([f"tasks.lm.data.source={text_corpus}", "tasks.lm.trainer.max_steps=2",
                             "tasks.lm.trainer.log_every=1", "tasks.lm.trainer.ckpt_every=2",
                             "tasks.lm.trainer.eval_every=2", "tasks.lm.trainer.eval_batches=300"]))
    logged_at: dict[int, float] = {}

    class Timed(LocalSession):
        def log_step(self, entry):
            logged_at[entry["step"]] = time.perf_counter()

    state = train(cfg, "lm", shards["lm"], Timed(tmp_path))
    first, last = state.history
    assert "val_loss" in last and "val_loss" not in first
    tokens = cfg.task("lm").trainer.global_batch_size * cfg.task("lm").data.seq_len  # one step's
    window_s = tokens / last["tokens_per_s"]
    gap_s = logged_at[2] - logged_at[1]  # step 2's training, its validation, and its report
    assert window_s < 0.5 * gap_s, (window_s, gap_s)


def test_eta_counts_validations_apart():
    """The ETA is training's pace per step plus validation's per validation still to come: 10
    steps in 30 s of which one validation took 20 s, 90 steps and 9 validations to go."""
    assert _eta(30.0, 20.0, 1, 10, 90, 9) == pytest.approx(1.0 * 90 + 20.0 * 9)
    assert _eta(10.0, 0.0, 0, 10, 90, 9) == pytest.approx(90.0)  # no validation seen yet: nothing to go by
    assert _eta(30.0, 20.0, 1, 10, 0, 0) == 0.0
