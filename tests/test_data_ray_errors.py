"""Errors raised inside prepare/shard's Ray tasks reach the driver as the task's own exception:
a data error prints the same one line with `data.ray=true` as in-process (not Ray's coloured
remote traceback), and an unknown error keeps Ray's remote traceback, chained, so a bug stays
debuggable."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.config import validate
from pipeline.config.schema import TextDataConfig
from pipeline.data.build import prepare
from pipeline.data.parallel import ordered_flatmap, ordered_map
from pipeline.data.sources import DataSourceError
from tests.conftest import ROOT, tiny_raw


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module, started as test_data_scale's (about 6 s on 2 cores)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def bad_jsonl(tmp_path: Path) -> Path:
    """A .jsonl source whose second line is not JSON (the audit's reproducer)."""
    src = tmp_path / "in_badjson"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "a perfectly ordinary first document of text"}\n{"text": broken\n')
    return src


def _in_process_message(source: Path, tmp_path: Path) -> str:
    with pytest.raises(DataSourceError) as local:
        prepare(TextDataConfig(source=str(source), vocab_size=300, seq_len=32), 7, tmp_path / "local")
    return str(local.value)


def test_a_data_error_in_a_ray_task_is_the_in_process_error(local_ray, bad_jsonl, tmp_path):
    """prepare's per-file streaming-generator tasks: the driver gets a plain DataSourceError with
    the in-process text (no `ray::clean_unit()` header, no ANSI codes), chained from Ray's error."""
    from ray.exceptions import RayTaskError

    expected = _in_process_message(bad_jsonl, tmp_path)
    assert expected.endswith("a.jsonl:2: invalid JSON (Expecting value)")
    with pytest.raises(DataSourceError) as remote:
        prepare(TextDataConfig(source=str(bad_jsonl), vocab_size=300, seq_len=32, ray=True), 7, tmp_path / "ray")
    assert type(remote.value) is DataSourceError  # not Ray's RayTaskError(DataSourceError) dual class
    assert str(remote.value) == expected
    assert isinstance(remote.value.__cause__, RayTaskError)  # Ray's remote traceback, kept in the chain


def test_the_prepare_stage_prints_one_line_with_data_ray(local_ray, bad_jsonl, tmp_path, monkeypatch, capsys):
    """What `python -m stages.prepare lm ... tasks.lm.data.ray=true` prints: the in-process line,
    exit code 2 (the stage reuses the module's Ray: connect() sees it initialised)."""
    from pipeline.cli import stage_main
    from stages.prepare import run

    expected = _in_process_message(bad_jsonl, tmp_path)
    cfg = validate(tiny_raw([f"tasks.lm.data.source={bad_jsonl}", "tasks.lm.data.ray=true"]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        stage_main("prepare", run, ["lm", "--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip().splitlines() == [f"error [prepare lm]: {expected}"]
    assert "\x1b[" not in err


def _failing(streaming: bool) -> Callable:
    """A task function that raises a plain bug at item 2. Made inside a function so that Ray
    pickles it by value: the workers cannot import this test module."""
    def boom_map(x: int) -> int:
        if x == 2:
            raise RuntimeError(f"bug at item {x}")
        return x

    def boom_flat(x: int) -> Iterator[int]:
        yield x
        if x == 2:
            raise RuntimeError(f"bug at item {x}")

    return boom_flat if streaming else boom_map


@pytest.mark.parametrize("streaming", [False, True], ids=["ordered_map", "ordered_flatmap"])
def test_an_unknown_error_keeps_the_remote_traceback(local_ray, streaming: bool):
    """A bug (not a known error) is raised as itself too, but chained from Ray's error, whose text
    is the task's remote traceback: printed unhandled, it still shows where the task failed."""
    from ray.exceptions import RayTaskError

    fn = _failing(streaming)
    mapper = ordered_flatmap if streaming else ordered_map
    seen = []
    with pytest.raises(RuntimeError, match=r"^bug at item 2$") as caught:
        for value in mapper(fn, range(5), True, window=2):
            seen.append(value)
    assert type(caught.value) is RuntimeError
    assert seen == ([0, 1, 2] if streaming else [0, 1])  # results before the error, in order
    ray_error = caught.value.__cause__
    assert isinstance(ray_error, RayTaskError)
    remote_traceback = str(ray_error)  # (its text: the task's frames, as Ray prints them)
    assert f"ray::{fn.__name__}()" in remote_traceback, remote_traceback
    assert 'raise RuntimeError(f"bug at item {x}")' in remote_traceback, remote_traceback


def _twice_fn():
    """A generator function Ray ships by value (a nested one, as `_failing`'s: the workers cannot
    import this test module by name)."""
    def twice(x: int) -> Iterator[int]:
        yield x
        yield x

    return twice


@pytest.mark.parametrize("use_ray", [False, True], ids=["in_process", "ray"])
def test_flatmap_counts_an_item_done_once_its_outputs_are_taken(local_ray, use_ray: bool):
    """The prepare stage's progress: an input file counts as done once all its documents were
    taken, not when its Ray task was handed out (a window of them runs ahead; counting those
    reached 100% while the last files were still being read)."""
    seen: list[int] = []
    counted: list[int] = []
    for value in ordered_flatmap(_twice_fn(), range(5), use_ray, window=3, done=lambda: counted.append(len(seen))):
        seen.append(value)
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert counted == [2, 4, 6, 8, 10]  # after each item's second output, never ahead of it


@pytest.mark.parametrize("use_ray", [False, True], ids=["in_process", "ray"])
def test_shard_counts_documents_once_they_are_encoded(local_ray, built_data, monkeypatch, use_ray: bool):
    """The shard stage's tokenizing progress counted a batch when `ordered_map` took it as input:
    with Ray a window of batches runs ahead, so a split of fewer documents than that window was
    at 100% before anything was encoded. Each count now follows its batch's encoded result."""
    from contextlib import contextmanager

    import pipeline.data.build as build

    cfg, shards = built_data
    data = cfg.task("lm").data.model_copy(update={"ray": use_ray})
    prepared = shards["lm"].parent / "prepared"
    taken: list[int] = []
    at_count: list[tuple[int, int]] = []  # (documents counted, encoded batches taken by then)

    def watched_map(fn, items, ray_on, window=None):
        for result in ordered_map(fn, items, ray_on, window):
            taken.append(1)
            yield result

    class Recorder:
        def step(self, n: int) -> None:
            at_count.append((n, len(taken)))

    @contextmanager
    def recording(*args, **kwargs):
        yield Recorder()

    monkeypatch.setattr(build, "ordered_map", watched_map)
    monkeypatch.setattr(build, "counting", recording)
    eos = yaml.safe_load((prepared / "stats.json").read_text()).get("eos_token", build.text.EOS)
    rows = list(build._token_rows(data, prepared / "train.parquet", (prepared / "tokenizer.json").read_text(), eos))
    assert rows and at_count and [taken for _, taken in at_count] == list(range(1, len(at_count) + 1)), at_count
    import pyarrow.parquet as pq

    assert sum(n for n, _ in at_count) == pq.ParquetFile(prepared / "train.parquet").metadata.num_rows
