"""Thin DVC stage entry points: parse config, call the library.

dvc.yaml runs each stage as `python -m stages.<name>`: whatever `python` is first on PATH.
`.venv/bin/dvc repro` without the environment activated finds the system's, which lacks the
project's dependencies; importing this package checks a few of them (a lookup, no import) and
stops with one line saying what to do, instead of a ModuleNotFoundError traceback in a stage.
"""

from __future__ import annotations

import importlib.util
import sys

# Distributions every stage needs, by import name; looked up, not imported (cheap).
REQUIRED = ("pyarrow", "pydantic", "yaml", "torch")
ENVIRONMENT_HINT = "stages need the project's environment: source .venv/bin/activate (or run make repro)"


def check_environment(required: tuple[str, ...] = REQUIRED) -> None:
    """Exit 2 with one line on stderr when this interpreter lacks one of `required`."""
    missing = [name for name in required if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {sys.executable} has no {', '.join(missing)}; {ENVIRONMENT_HINT}", file=sys.stderr)
        raise SystemExit(2)


check_environment()
