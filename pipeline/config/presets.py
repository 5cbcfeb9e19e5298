"""Whether a model config is the preset its `preset` field names.

`preset` is a label the group file sets (`configs/model/gpt_1b.yaml` says `preset: gpt_1b`); run
names, MLflow tags and registry descriptions show it. Setting the label alone
(`-S tasks.lm.model.preset=gpt_1b`, where `-S 'model@tasks.lm.model=gpt_1b'` picks the preset) trains
the model the other fields describe under the 1B's name; so does a preset whose own values were
changed after it was picked. Neither is an error (a modified preset is a normal experiment, and a
config that trained must still evaluate and export), so the train stage and `pipeline validate` say
it in one warning line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CUSTOM = "custom"
_MISSING = object()


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_value(got: Any, want: Any) -> bool:
    """A config value equal to a preset's: numbers by value (2 is 2.0), lists and tuples alike."""
    number = (int, float)
    if isinstance(got, number) and isinstance(want, number) and not isinstance(got, bool | str):
        return float(got) == float(want)
    if isinstance(got, tuple | list) and isinstance(want, tuple | list):
        return len(got) == len(want) and all(_same_value(a, b) for a, b in zip(got, want, strict=True))
    return got == want


def preset_differences(model: Any, config_dir: Path = Path("configs")) -> list[str]:
    """The values the preset `model.preset` names sets itself (its group file's own keys, not the
    base it extends) that `model` (a model config, or its values as a dict) does not hold, as
    "key value (preset: value)". Empty for `custom`, a name without a file in
    `config_dir/model/`, or a model that is its preset."""
    values = model if isinstance(model, dict) else model.model_dump(mode="json")
    preset = str(values.get("preset", CUSTOM))
    file = config_dir / "model" / f"{preset}.yaml"
    if preset == CUSTOM or preset.startswith("_") or not file.is_file():
        return []
    own = yaml.safe_load(file.read_text()) or {}
    if not isinstance(own, dict):
        return []
    own = {k: v for k, v in own.items() if k not in ("defaults", "preset")}
    have = _flat(values)
    out = []
    for key, want in _flat(own).items():
        got = have.get(key, _MISSING)
        if got is _MISSING:
            out.append(f"no {key} ({preset}: {want})")
        elif not _same_value(got, want):
            out.append(f"{key} {got} ({preset}: {want})")
    return out


def preset_warning(model: Any, key: str, config_dir: Path = Path("configs")) -> str | None:
    """One line when the model at `key` (e.g. tasks.lm.model) is not the preset it is labelled."""
    diffs = preset_differences(model, config_dir)
    if not diffs:
        return None
    preset = model.preset
    shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    return (f"{key}.preset says {preset}, but the model is not that preset: {shown}; run names, MLflow tags and "
            f"the registry will call it {preset}. To train the preset itself pick its group file: "
            f"dvc exp run -S 'model@{key}={preset}'; to keep these values, label them: {key}.preset={CUSTOM} "
            "(or a name of yours)")
