"""Progress of long work in a log (no terminal): a line at most every `EVERY_S` seconds with
the count, share, time so far and ETA, one at the end when the work took longer, and nothing
for short work; the data stages' loops report through it."""

from __future__ import annotations

import re

import pipeline.progress as progress_module
from pipeline.progress import duration, progress


def test_progress_lines_in_a_log_count_share_and_eta(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)  # a line at every step
    assert list(progress(iter("abcd"), "[prepare]", "reading", 4, "files")) == list("abcd")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(", ")[0] for line in lines[:-1]] == \
        [f"[prepare] reading: {i}/4 files ({i / 4:.0%})" for i in (1, 2, 3)]
    assert all(re.search(r", \d+s, eta \d+s$", line) for line in lines[:-1]), lines
    assert re.fullmatch(r"\[prepare\] reading: done in \d+s", lines[-1]), lines


def test_short_work_is_silent_in_a_log(capsys):
    assert sum(progress(range(1000), "[shard]", "tokenizing", 1000, "docs")) == sum(range(1000))
    assert capsys.readouterr().out == ""


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
