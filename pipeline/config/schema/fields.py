"""The config models' common ground: unknown keys refused, values frozen, booleans refused where
a number belongs (and anything but a boolean where one belongs), and the constrained number types every
section uses."""

from __future__ import annotations

import types
from functools import cache
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Decay = Annotated[float, Field(ge=0, lt=1)]  # a running average's decay (Adam's betas): 1 would never update


def _not_a_base(name: str) -> str:
    """A model group's `_`-prefixed file (`_gpt_base`) is the base its presets extend, and names
    itself so: `pipeline compose` refuses picking it, but `dvc exp run -S 'model@...=_gpt_base'`
    composes with DVC's own Hydra call, and would train the base's placeholder sizes."""
    if name.startswith("_"):
        raise ValueError(f"'{name}' is the base the model presets share, not a preset: pick a preset "
                         "(e.g. dvc exp run -S 'model@tasks.lm.model=gpt_small'), or label a model of your own "
                         "preset=custom")
    return name


PresetName = Annotated[str, AfterValidator(_not_a_base)]  # a model's preset label (configs/model/<name>.yaml)


def _options(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may be: through Annotated, Optional and unions."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _options(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _options(arg)]
    return [annotation]


def _numeric(options: list[Any]) -> bool:
    """A number is among the options and a boolean is not."""
    return bool not in options and any(t in (int, float) for t in options)


def _boolean(options: list[Any]) -> bool:
    """Only a boolean (or nothing) is among the options."""
    return bool in options and all(t in (bool, type(None)) for t in options)


@cache
def _typed_fields(model: type[BaseModel]) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The fields of `model` that hold a number, those that hold a list of numbers, and those that
    hold a boolean."""
    numbers, lists, booleans = set(), set(), set()
    for name, info in model.model_fields.items():
        options = _options(info.annotation)
        if _numeric(options):
            numbers.add(name)
        if _boolean(options):
            booleans.add(name)
        items = [t for o in options if get_origin(o) in (list, tuple, set, frozenset)
                 for arg in get_args(o) if arg is not Ellipsis for t in _options(arg)]
        if _numeric(items):
            lists.add(name)
    return frozenset(numbers), frozenset(lists), frozenset(booleans)


def _not_a_bool(loc: tuple[str | int, ...], value: bool) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("bool_for_number", "expected a number, not a boolean"),
                            loc=loc, input=value)


def _not_a_number_for_bool(loc: tuple[str | int, ...], value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("number_for_bool", "expected true or false"), loc=loc,
                            input=value)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        """`lr: true` (or DVC's `-S key=true`, a Python bool from Hydra) is refused where a number
        belongs, naming the key, instead of becoming 1.0 (pydantic's lax mode takes a boolean for
        a number). Every model's every number field, lists of numbers included. The other way round
        too: `nesterov=1` or `onnx: "no"` where a boolean belongs is refused (lax mode takes 1, 0 and
        strings such as "off"), since a typo there silently flips a switch."""
        if not isinstance(data, dict):
            return data
        numbers, lists, booleans = _typed_fields(cls)
        bad = [_not_a_bool((k,), v) for k, v in data.items() if k in numbers and isinstance(v, bool)]
        bad += [_not_a_bool((k, i), x) for k, v in data.items() if k in lists and isinstance(v, list | tuple)
                for i, x in enumerate(v) if isinstance(x, bool)]
        bad += [_not_a_number_for_bool((k,), v) for k, v in data.items()
                if k in booleans and v is not None and not isinstance(v, bool)]
        if bad:
            raise ValidationError.from_exception_data(cls.__name__, bad)
        return data
