"""Training checkpoints and final model artifacts.

A checkpoint directory holds the strategy's training state (its own layout: `state.pt` for
the replicated backends, a DCP directory for FSDP, a DeepSpeed checkpoint), optionally
`model.safetensors` (consolidated fp32 weights, in the final checkpoint) and `meta.json`
(step, data reader position, metric history). `meta.json` is written last: a directory
without it is incomplete and is never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_dir, atomic_write_text

STATE, META, WEIGHTS, SPEC = "state.pt", "meta.json", "model.safetensors", "model_spec.json"


class CheckpointError(RuntimeError):
    pass


def write_checkpoint_meta(directory: Path, meta: dict[str, Any],
                          weights: dict[str, torch.Tensor] | None = None) -> None:
    """Rank 0, after the strategy has saved: export weights (final checkpoint), then the marker."""
    directory.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        save_file(weights, str(directory / WEIGHTS))
    atomic_write_text(directory / META, json.dumps(meta))


def read_meta(directory: Path) -> dict[str, Any]:
    """The small part of a checkpoint (step, reader position, history), without loading any tensors."""
    if not (directory / META).is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete (no {META}); refusing to load it")
    return json.loads((directory / META).read_text())


def load_training_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`state.pt` and meta of a replicated-strategy (DDP, Horovod) checkpoint, for inspection."""
    meta = read_meta(directory)
    return torch.load(directory / STATE, map_location="cpu", weights_only=True), meta


def write_model(out_dir: Path, weights: dict[str, torch.Tensor], spec: dict[str, Any],
                extra: dict[str, str] | None = None) -> None:
    """Weights as safetensors plus the model spec, swapped into place in one rename."""
    with atomic_dir(out_dir) as tmp:
        save_file(weights, str(tmp / WEIGHTS))
        (tmp / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)


def read_model(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    for name in (WEIGHTS, SPEC):
        if not (model_dir / name).is_file():
            raise CheckpointError(f"{model_dir / name} is missing: run the train stage first")
    return load_file(str(model_dir / WEIGHTS)), json.loads((model_dir / SPEC).read_text())


def load_model(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model (eval mode) from its directory."""
    from pipeline.tasks import task_for_spec

    weights, spec = read_model(model_dir)
    if spec.get("model", {}).get("norm_impl") == "apex":  # same weights; inference needs no apex
        spec = {**spec, "model": {**spec["model"], "norm_impl": "torch"}}
    model = task_for_spec(spec).build(spec)
    model.load_state_dict(weights)
    return model.eval(), spec
