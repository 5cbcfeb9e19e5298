"""Tasks: the glue between a data kind and a model family."""

from __future__ import annotations

from typing import Any

from pipeline.tasks.base import Task
from pipeline.tasks.diffusion import Denoising
from pipeline.tasks.lm import LanguageModeling

_BY_DATA = {"text": LanguageModeling, "images": Denoising}
_BY_SPEC = {"lm": LanguageModeling, "diffusion": Denoising}


def task_for_data(kind: str) -> Task:
    return _BY_DATA[kind]()


def task_for_spec(spec: dict[str, Any]) -> Task:
    return _BY_SPEC[spec["task"]]()


__all__ = ["Task", "task_for_data", "task_for_spec"]
