"""Training state as a torch.distributed.checkpoint (DCP): one format for every layout.

Model and optimizer state are keyed by parameter name (the optimizer's state flattened to
`state.<param>.<key>` and `param_groups.<param>.<key>`), never by position or rank, and every
tensor records its global shape. So the checkpoint a layout writes (FSDP2 shards, tensor-
parallel slices, one pipeline stage per rank) loads under any other, DCP resharding on read,
and a replicated model (DDP) reads it whole. The replicated backends' own `state.pt` (DDP,
Horovod: whole tensors, the optimizer's state keyed by position) loads under every layout
too: each rank reads it whole and keeps its own shard or stage (`load`).

Tied weights have one name per holder: a layout holding the whole model saves the optimizer
state under the group's first name (`embed.weight`), while the last pipeline stage, which holds
no embedding, knows the weight only as `head.weight`. Saving keeps each rank's own names (a
pipeline checkpoint holds both); loading reads a tied name a checkpoint lacks from the name it
has (`tied_aliases`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

DCP_DIR = "dcp"
LEGACY_DIRS = ("fsdp",)  # where FSDP2 checkpoints were written before every layout shared one format
SCALER = "scaler.json"  # the fp16 loss scaler's state (`save_scaler`)
_SECTIONS = ("model", "optim")  # the name-keyed, flat parts of `state` (tied aliases apply to these)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {"model": model_sd, "optim": optim_sd, "extra": extra}


def tied_aliases(ties: Iterable[Sequence[str]]) -> dict[str, str]:
    """Each tied name -> its group's first name (`pipeline_parallel.tie_groups` order): the
    name a layout holding the whole model keys the shared optimizer state by."""
    return {name: names[0] for names in ties for name in names[1:]}


def _canonical(key: str, aliases: dict[str, str]) -> str | None:
    """A flat model or optimizer key (`head.weight`, `state.head.weight.exp_avg`,
    `param_groups.head.weight.lr`) under its tied group's first name; None if not tied."""
    for alias, first in aliases.items():
        if key == alias:
            return first
        for prefix in ("state.", "param_groups."):
            head = f"{prefix}{alias}."
            if key.startswith(head) and "." not in key[len(head):]:
                return f"{prefix}{first}.{key[len(head):]}"
    return None


def find(directory: Path) -> Path | None:
    """The DCP folder of a checkpoint, if it has one."""
    for name in (DCP_DIR, *LEGACY_DIRS):
        if (directory / name / ".metadata").is_file():
            return directory / name
    return None


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Collective: every rank writes its own part; DCP de-duplicates replicated tensors."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state(model, optimizer, extra), checkpoint_id=str(directory / DCP_DIR))


def save_scaler(directory: Path, state: dict[str, Any], write: bool) -> None:
    """The fp16 loss scaler's state (its scale and growth tracker: the same on every rank), as
    `scaler.json` beside any layout's state, written by the one rank `write` names: a run resumed
    in this layout or another goes on with the scale it had, not a fresh 65536 that overflows again."""
    if state and write:
        import json

        from pipeline.atomic import atomic_write_text

        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / SCALER, json.dumps(state))


def load_scaler(directory: Path) -> dict[str, Any]:
    """`save_scaler`'s state, or {} for a checkpoint without one (no fp16 scaler, or older)."""
    import json

    return json.loads((directory / SCALER).read_text()) if (directory / SCALER).is_file() else {}


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], ties: Iterable[Sequence[str]] = ()) -> dict[str, Any]:
    """Collective: read into this rank's tensors in place (whatever layout wrote them) and
    return `extra` as saved. `ties`: the full model's tied-name groups, for a rank that holds
    a tied weight under another name than the writer saved it by (a pipeline stage)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from pipeline.distributed.replicated import STATE

    found = find(directory)
    if found is None and not (directory / STATE).is_file():
        raise FileNotFoundError(f"checkpoint {directory} holds no DCP state ({DCP_DIR}/.metadata) "
                                f"nor a replicated one ({STATE})")
    aliases = tied_aliases(ties)
    current = state(model, optimizer, extra)
    if found is not None:
        stored = set(dcp.FileSystemReader(str(found)).read_metadata().state_dict_metadata)
        read, names = _reading_names(current, stored, aliases)
        dcp.load(read, checkpoint_id=str(found))
        for section in _SECTIONS:  # DCP replaces non-tensor values (param groups): take them back
            current[section] = {key: read[section][names[section][key]] for key in current[section]}
    else:  # DDP's or Horovod's whole state: each rank keeps its part
        _fill_from_replicated(current, directory / STATE, model, optimizer, aliases)
    set_state_dict(model, optimizer, model_state_dict=current["model"], optim_state_dict=current["optim"],
                   options=_options())
    return current["extra"]


def _reading_names(current: dict[str, Any], stored: set[str], aliases: dict[str, str]
                   ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """What to ask DCP for: `current` with each tied key the checkpoint lacks renamed to the
    name it was saved under (the same tensors, filled in place), and each section's key -> the
    key it is read as."""
    read: dict[str, Any] = {"extra": current["extra"]}
    names: dict[str, dict[str, str]] = {}
    for section in _SECTIONS:
        read[section], names[section] = {}, {}
        for key, value in current[section].items():
            first = _canonical(key, aliases) if f"{section}.{key}" not in stored else None
            name = first if first is not None and f"{section}.{first}" in stored else key
            names[section][key] = name
            read[section].setdefault(name, value)  # a whole-model rank holds both tied names: one tensor
    return read, names


def replicated_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (its `state_dict` position ->
    name), as DCP names them: written into a replicated `state.pt`, so a sharded or pipeline
    layout can tell which position is which parameter, whichever of them it holds."""
    from pipeline.distributed.sharded_init import parameter_names

    names = parameter_names(model)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _fill_from_replicated(current: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                          aliases: dict[str, str]) -> None:
    """Fill `current` (this rank's state, as `state` builds it) from a replicated `state.pt`:
    every rank reads the whole file and copies its own slice of each tensor (a DTensor shard,
    or the whole tensor of a parameter its stage holds), which is what DCP would read from a
    sharded checkpoint of the same weights."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    optim = _flat_optimizer(saved, path, model, optimizer)
    for section, source in (("model", saved["model"]), ("optim", optim)):
        target = current[section]
        for key in list(target):
            name = key if key in source else _canonical(key, aliases)
            if name not in source:
                raise KeyError(f"{path} holds no '{key}' for this layout's {section} state")
            target[key] = _take(target[key], source[name])
    current["extra"] = _fill_nested(current["extra"], saved.get("extra", {}), f"{path} extra")


def _flat_optimizer(saved: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
                    ) -> dict[str, Any]:
    """A replicated optimizer state dict (keyed by position) in DCP's flat, name-keyed form."""
    osd = saved["optimizer"]
    positions = [i for group in osd["param_groups"] for i in group["params"]]
    names = saved.get("param_names")
    if names is None:  # written before state.pt named its parameters
        mine = [len(g["params"]) for g in optimizer.param_groups]
        if mine != [len(g["params"]) for g in osd["param_groups"]]:
            from pipeline.training.checkpoint import CannotReshard

            raise CannotReshard(f"the checkpoint {path.parent} was written by DDP/Horovod without parameter names "
                                "and this layout holds only part of the model: resume it under DDP, Horovod, "
                                "FSDP or tensor parallelism (parallel.pp=1)")
        names = replicated_param_names(model, optimizer)  # the same factory over the same names: same order
    if len(names) != len(positions):
        raise KeyError(f"{path}: {len(names)} parameter names for {len(positions)} optimizer positions")
    name_of = dict(zip(positions, names, strict=True))
    flat: dict[str, Any] = {}
    for i, per_param in osd["state"].items():
        for k, v in per_param.items():
            flat[f"state.{name_of[i]}.{k}"] = v
    for group in osd["param_groups"]:
        for i in group["params"]:
            for k, v in group.items():
                if k != "params":
                    flat[f"param_groups.{name_of[i]}.{k}"] = v
    return flat


def _fill_nested(target: Any, source: Any, where: str) -> Any:
    """`source`'s values in `target`'s structure (nested dicts; tensors filled in place)."""
    if isinstance(target, dict):
        if not isinstance(source, dict) or not set(target) <= set(source):
            missing = sorted(set(target) - set(source)) if isinstance(source, dict) else list(target)
            raise KeyError(f"{where} holds no {missing[:3]} for this layout")
        return {k: _fill_nested(v, source[k], f"{where}.{k}") for k, v in target.items()}
    return _take(target, source)


@torch.no_grad()
def _take(target: Any, whole: Any) -> Any:
    """`target` filled from the whole value: a DTensor's local shard gets its slice of it, a
    plain tensor all of it; other values (learning rates, betas) are taken as they are."""
    if not isinstance(target, torch.Tensor):
        return whole
    if tuple(target.shape) != tuple(whole.shape):
        raise ValueError(f"shape {tuple(whole.shape)} in the checkpoint, {tuple(target.shape)} here")
    if hasattr(target, "to_local"):
        from pipeline.distributed.fsdp import local_slice

        target.to_local().copy_(local_slice(target, whole))
    else:
        target.copy_(whole)
    return target
