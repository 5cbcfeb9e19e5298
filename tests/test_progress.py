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


def test_work_that_fails_is_not_reported_done(monkeypatch, capsys):
    """A read that raised at file 3 of 4 printed "done in" before its traceback."""
    import pytest

    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)

    def files():
        yield from "ab"
        raise OSError("disk read failed on file 3")

    with pytest.raises(OSError, match="file 3"):
        list(progress(files(), "[prepare]", "reading", 4, "files"))
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[prepare\] reading: stopped after 2/4 files, \d+s", lines[-1]), lines
    assert not any("done in" in line for line in lines), lines


def test_the_bar_is_for_a_terminal_on_the_stream_it_draws_on(monkeypatch):
    """tqdm draws on stderr: `dvc repro 2> log` from a terminal put its carriage returns in the log
    (stdout was the stream checked), and stderr on a terminal with stdout piped got no bar."""
    import sys

    from pipeline.progress import _Bar, _Lines, counting

    for stdout_tty, stderr_tty, kind in [(True, False, _Lines), (False, True, _Bar)]:
        monkeypatch.setattr(sys.stdout, "isatty", lambda v=stdout_tty: v, raising=False)
        monkeypatch.setattr(sys.stderr, "isatty", lambda v=stderr_tty: v, raising=False)
        with counting("[shard]", "tokenizing", 2, "docs") as counter:
            counter.step(2)
        assert type(counter) is kind, (stdout_tty, stderr_tty)


def test_a_consumer_that_stops_early_is_no_failure(monkeypatch, capsys):
    import itertools

    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)
    items = progress(iter(range(10)), "[prepare]", "reading", 10, "files")
    assert list(itertools.islice(items, 3)) == [0, 1, 2]
    items.close()
    assert "stopped after" not in capsys.readouterr().out
