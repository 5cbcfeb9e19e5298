"""A newcomer's setup and clean-up: the Makefile's venv rule (Python version, a stale .venv), its
clean targets, and the stages' check that they run in the project's environment.

The Makefile is run for real on a copy (Makefile, pyproject.toml) in a temporary folder, with
stand-in interpreters that log their arguments and pretend a version, so nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="needs make")

# A stand-in for a Python interpreter: `--version` says VERSION, the Makefile's version check
# (`-c ...`) passes when NEW_ENOUGH is 1, `-m venv [--clear] DIR` makes DIR/bin/python a copy of
# itself, anything else (pip) succeeds. Every call is logged.
FAKE_PYTHON = """#!/bin/sh
echo "$0 $*" >> "{log}"
case "$1" in
  --version) echo "Python {version}" ;;
  -c) [ "{new_enough}" = 1 ] ;;
  -m) if [ "$2" = venv ]; then for dir; do :; done; rm -rf "$dir"; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python"; fi ;;
esac
"""


def _project(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "scripts").mkdir()
    horovod = tmp_path / "scripts" / "build_horovod.sh"
    horovod.write_text("#!/bin/sh\nexit 0\n")
    horovod.chmod(0o755)
    return tmp_path


def _python(path: Path, version: str, log: Path) -> Path:
    new_enough = int(tuple(map(int, version.split(".")[:2])) >= (3, 10))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON.format(log=log, version=version, new_enough=new_enough))
    path.chmod(0o755)
    return path


def _make(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    return subprocess.run([MAKE, "--no-print-directory", *args], cwd=project, capture_output=True, text=True,
                          timeout=60, env=env)


@needs_make
def test_setup_refuses_a_python_older_than_requires_python_in_one_line(tmp_path):
    """With python3 = 3.9, `make setup` went on to pip, which failed on torch with
    ResolutionImpossible and never named the Python version; now it stops first, in one line,
    creating nothing."""
    project, log = _project(tmp_path / "p"), tmp_path / "calls.log"
    old = _python(tmp_path / "bin" / "python3.9", "3.9.18", log)
    proc = _make(project, "setup", f"PYTHON={old}")
    assert proc.returncode != 0
    assert proc.stdout.strip() == (f"make setup needs Python >= 3.10 (pyproject's requires-python); {old} is Python "
                                   "3.9.18: install a newer Python and name it, e.g. make setup PYTHON=python3.12")
    assert not (project / ".venv").exists() and "-m venv" not in log.read_text()


@needs_make
@pytest.mark.skipif(not Path("/root/.pyenv/versions/3.9.18/bin/python3.9").exists(), reason="no real Python 3.9")
def test_setup_version_check_with_a_real_python_3_9(tmp_path):
    proc = _make(_project(tmp_path), "setup", "PYTHON=/root/.pyenv/versions/3.9.18/bin/python3.9")
    assert proc.returncode != 0 and "needs Python >= 3.10" in proc.stdout and "is Python 3.9.18" in proc.stdout


@needs_make
def test_setup_recreates_a_venv_left_by_an_older_python(tmp_path):
    """A .venv made by Python 3.9 (its setup failed) was reused by the next `make setup`, which
    failed the same way after a newer Python was installed; now it is recreated (`--clear`)."""
    project, log = _project(tmp_path / "p"), tmp_path / "calls.log"
    _python(project / ".venv" / "bin" / "python", "3.9.18", log)
    new = _python(tmp_path / "bin" / "python3.12", "3.12.1", log)
    proc = _make(project, ".venv/.installed", f"PYTHON={new}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ".venv was made by Python 3.9.18, not Python >= 3.10: recreating it" in proc.stdout
    assert f"{new} -m venv --clear .venv" in log.read_text().splitlines()
    assert subprocess.run([project / ".venv" / "bin" / "python", "--version"], capture_output=True,
                          text=True).stdout.strip() == "Python 3.12.1"
    assert (project / ".venv" / ".installed").exists()
    # a fresh checkout: no venv to recreate, no message
    fresh, log2 = _project(tmp_path / "fresh"), tmp_path / "fresh.log"
    proc = _make(fresh, ".venv/.installed", f"PYTHON={_python(tmp_path / 'bin2' / 'python3', '3.11.2', log2)}")
    assert proc.returncode == 0 and "recreating" not in proc.stdout and "--clear" not in log2.read_text()


@needs_make
def test_clean_runs_keeps_the_mlflow_store_and_clean_store_asks_and_names_the_rebuild(tmp_path):
    """`make clean-runs` deleted mlruns.db and mlartifacts too, while registry/<task>.json and
    models/ survived: `dvc repro` saw nothing to redo and the champion was gone for good. Now it
    removes runs/ only; `make clean-store CONFIRM=1` removes the store with registry/ and says how
    to rebuild."""
    project = _project(tmp_path)
    made = ["runs/ray/lm-1/checkpoint", "mlruns.db", "mlartifacts/1/a", "registry/lm.json", "models/lm/run.json"]
    for rel in made:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    assert _make(project, "clean-runs").returncode == 0
    assert not (project / "runs").exists()
    assert all((project / rel).exists() for rel in made[1:])

    refused = _make(project, "clean-store")
    assert refused.returncode != 0 and "run make clean-store CONFIRM=1" in refused.stdout
    assert all((project / rel).exists() for rel in made[1:])  # nothing deleted unasked

    done = _make(project, "clean-store", "CONFIRM=1")
    assert done.returncode == 0, done.stderr
    assert not any((project / p).exists() for p in ("mlruns.db", "mlartifacts", "registry"))
    assert (project / "models/lm/run.json").exists()
    assert "rebuild both with dvc repro --force" in done.stdout


def _lacks_deps(python: str) -> bool:
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('pyarrow') is None)"
    return shutil.which(python) is not None and subprocess.run([python, "-c", probe]).returncode == 1


@pytest.mark.skipif(not _lacks_deps("/usr/bin/python3"), reason="no Python without the project's dependencies")
def test_a_stage_outside_the_environment_is_one_line_exit_2():
    """`.venv/bin/dvc repro` without the venv activated runs the system `python -m stages.<name>`,
    which died with `ModuleNotFoundError: pyarrow` deep in an import; now one line says what to do."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run(["/usr/bin/python3", "-m", "stages.train", "lm"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: /usr/bin/python3 has no pyarrow"), proc.stderr
    assert lines[0].endswith("; stages need the project's environment: source .venv/bin/activate (or run make repro)")


def test_stage_environment_check_names_what_is_missing(monkeypatch, capsys):
    import importlib.util

    import stages

    stages.check_environment()  # this interpreter (the venv) has them: nothing happens
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        stages.check_environment()
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {sys.executable} has no pyarrow; stages need the project's "
                                       "environment: source .venv/bin/activate (or run make repro)\n")
