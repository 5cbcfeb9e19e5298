"""Tasks: the glue between a data kind and a model family.

`TASKS` is the one registry. A task has one name (`Task.name`: `lm`, `diffusion`), the same one
the config uses for its chain (`tasks.lm`), the model spec records as its `task` (so export,
evaluation and the registry rebuild the right model) and the stages carry (`train@lm`). Each
task also says which data it trains on (`Task.data_kind`, the `data.kind` of its config:
`text`, `images`); that is a kind of data, not another name of the task.
"""

from __future__ import annotations

from typing import Any

from pipeline.tasks.base import Task
from pipeline.tasks.diffusion import Denoising
from pipeline.tasks.lm import LanguageModeling

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (LanguageModeling, Denoising)}


def task_named(name: str) -> Task:
    """The task called `name` (`lm`, `diffusion`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (known tasks: {', '.join(TASKS)})")
    return TASKS[name]()


def task_for_spec(spec: dict[str, Any]) -> Task:
    """The task of a model spec (what export writes beside the weights): its `task` field."""
    name = spec.get("task") if isinstance(spec, dict) else None
    if name is None:
        raise ValueError(f"a model spec without a 'task' field (expected one of: {', '.join(TASKS)})")
    return task_named(name)


def task_for_data(kind: str) -> Task:
    """The task that trains on data of `kind` (a config's `data.kind`: `text`, `images`)."""
    for cls in TASKS.values():
        if cls.data_kind == kind:
            return cls()
    known = ", ".join(f"{cls.data_kind} ({name})" for name, cls in TASKS.items())
    raise ValueError(f"no task trains on data kind '{kind}' (known data kinds: {known})")


__all__ = ["TASKS", "Task", "task_for_data", "task_for_spec", "task_named"]
