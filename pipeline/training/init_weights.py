"""The weights a run starts from (`trainer.init_from`, `model.init_from`), checked on the driver.

Before any worker or MLflow run exists, damage or a mismatch in those weights is one line naming
the file and the tensor (instead of a safetensors error in every worker, retried): checksums and
safetensors headers, every parameter's name, shape and dtype under the names the loader reads,
and, for a Llama folder given to a GPT of the config's own architecture, the fields its weights
compute with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline.training.checkpoint import WEIGHTS, safetensors_shapes, verify_model_dir


def check_init_weights(path: Path, key: str, spec: dict[str, Any] | None = None) -> None:
    """The weights a run starts from (`trainer.init_from`, `model.init_from`), checked on the
    driver before any worker or run exists, so damage is one line naming the file instead of a
    safetensors error in every worker, retried: a folder's `checksums.json` (our model and export
    folders) is compared file by file, and every safetensors file it reads (one, or those a
    Hugging Face index lists) must have a header that covers the file. With the model's `spec`,
    every parameter the loader will read must be there with the model's shape
    (`check_init_shapes`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    if not path.is_dir():
        safetensors_shapes(path)
    else:
        from pipeline.models.hf import INDEX, is_hf_folder, no_safetensors, read_weight_map

        verify_model_dir(path, required=False)  # a transformers folder has none
        index = path / INDEX
        if not index.is_file() and not (path / WEIGHTS).is_file() and is_hf_folder(path):
            # (a transformers folder of .bin files: say how to convert it, not just "model.safetensors is missing")
            raise FileNotFoundError(no_safetensors(path, key))
        # the files the loader reads, in transformers' order (HFCheckpoint): model.safetensors whenever it is
        # there (an index beside it is save_pretrained's stale leftover), else the files the index lists
        sharded = index.is_file() and not (path / WEIGHTS).is_file()
        files = [path / name for name in sorted(set(read_weight_map(index).values()))] if sharded \
            else [path / WEIGHTS]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{key}: {file} is missing" + (f" (listed in {index.name})" if sharded else ""))
            safetensors_shapes(file)
    if spec is not None:
        check_init_shapes(path, key, spec)


def check_task_init_weights(tcfg: Any, task_name: str, spec: dict[str, Any] | None) -> None:
    """`check_init_weights` for both of a task's weights keys (`model.init_from`,
    `trainer.init_from`) that are set, each named as the config has it (`tasks.<task>.<key>`): the
    one driver-side check every flow that starts workers runs first (train, sweep), so damaged or
    misfitting weights are one line there, not a safetensors error in every worker or trial."""
    for key, weights in (("model.init_from", getattr(tcfg.model, "init_from", None)),
                         ("trainer.init_from", tcfg.trainer.init_from)):
        if weights:
            check_init_weights(Path(weights), f"tasks.{task_name}.{key}", spec)


def _check_llama_architecture(path: Path, key: str, model: dict[str, Any]) -> None:
    """A Llama folder as `trainer.init_from` gives its weights to a GPT whose architecture is the
    config's own (`model.init_from` takes it from the checkpoint): tensors of the right shapes under
    another RoPE base, norm epsilon or norm would train another network, so each such field must
    agree with the checkpoint's config.json."""
    from pipeline.config.pretrained import HF_CONFIG, architecture_differences, read_hf_config

    where = f"{key}: {path / HF_CONFIG}"
    for name, theirs, ours in architecture_differences(read_hf_config(path, key), model, where)[:1]:
        raise ValueError(f"{where}: {name} is {theirs}, the model's is {ours}: its weights would compute another "
                         f"function. Point model.init_from at the folder instead (the architecture then comes from "
                         f"its config.json), or set the model's {name} to {theirs}")


def check_init_shapes(path: Path, key: str, spec: dict[str, Any]) -> None:
    """Every parameter of the model `spec` builds (on the meta device: no memory) is found in
    the weights at `path` with its shape, read from the safetensors headers only, under the names
    the loader reads (`pipeline.distributed.sharded_init.copy_from_safetensors`: our state-dict
    names, the older fused layout's tensors, or a Hugging Face Llama folder's names), stored as a
    plain float (a float8 or integer tensor is quantized: cast, it would load as garbage). Otherwise
    a ValueError naming the file, the tensor and both shapes (or its dtype): the workers would fail
    identically."""
    from pipeline.distributed.sharded_init import parameter_names
    from pipeline.models.hf import INDEX, HFCheckpoint, check_float, is_hf_folder
    from pipeline.models.legacy import fused_source
    from pipeline.tasks import task_for_spec

    path = Path(path)
    with torch.device("meta"):
        model = task_for_spec(spec).build(spec)
    names = parameter_names(model)
    need = {names[id(p)]: tuple(p.shape) for p in model.parameters()}
    headers: dict[Path, dict[str, tuple[int, ...]]] = {}
    dtypes: dict[Path, dict[str, str]] = {}

    def shapes(file: Path) -> dict[str, tuple[int, ...]]:
        if file not in headers:
            headers[file] = safetensors_shapes(file)
        return headers[file]

    def check_dtype(file: Path, name: str, ours: str) -> None:
        if file not in dtypes:
            with safe_open(str(file), "pt") as f:  # (the header only; shapes() has read it as safetensors)
                dtypes[file] = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a dict)
        check_float(dtypes[file][name], file, name, ours, key)

    if is_hf_folder(path):
        checkpoint = HFCheckpoint(path, key)
        try:
            mapped = checkpoint.names(list(need))
        except KeyError as e:  # a parameter the Llama layout does not have (learned positions, LayerNorm biases)
            raise ValueError(f"{key}: {path} is a Llama checkpoint, and the model does not have its layout "
                             f"({e.args[0]})") from None
        for ours, theirs in mapped.items():
            fname = checkpoint.file_of(theirs)  # the loader's own lookup (one file, or the index's)
            if fname is None:
                raise ValueError(f"{key}: {path / INDEX} maps no file to '{theirs}' (the model's '{ours}')")
            held = shapes(path / fname)
            if theirs not in held:
                raise ValueError(f"{key}: {path / fname} has no tensor '{theirs}' (the model's '{ours}')")
            if held[theirs] != need[ours]:
                raise ValueError(f"{key}: {path / fname}: '{theirs}' has shape {held[theirs]}, the model's "
                                 f"'{ours}' needs {need[ours]}")
            check_dtype(path / fname, theirs, ours)
        checkpoint.check_tied_head()
        if spec.get("model", {}).get("kind", "gpt") == "gpt":  # the layout fits: does it compute the same?
            _check_llama_architecture(path, key, spec["model"])
        return
    file = path / WEIGHTS if path.is_dir() else path
    held = shapes(file)
    cut: dict[str, list[str]] = {}  # fused tensor -> the split parameters cut out of it
    for name, shape in need.items():
        if name in held:
            if held[name] != shape:
                raise ValueError(f"{key}: {file}: '{name}' has shape {held[name]}, the model needs {shape}")
            check_dtype(file, name, name)
            continue
        source = fused_source(name)
        if source is None or source[0] not in held:
            raise ValueError(f"{key}: {file} has no tensor '{name}' (it holds {len(held)} others; the model needs "
                             f"{shape})")
        fused = held[source[0]]  # saved before q/k/v and SwiGLU were split: the loader takes rows of it
        if fused[1:] != shape[1:] or fused[0] < shape[0]:
            raise ValueError(f"{key}: {file}: '{source[0]}' has shape {fused}, which holds no {shape} for the "
                             f"model's '{name}'")
        cut.setdefault(source[0], []).append(name)
    for fused_name, parts in cut.items():  # the rows are taken by position: the parts must fill it exactly
        rows = sum(need[part][0] for part in parts)
        if held[fused_name][0] != rows:
            raise ValueError(f"{key}: {file}: '{fused_name}' has {held[fused_name][0]} rows, the model's "
                             f"{', '.join(repr(p) for p in parts)} take {rows} (another model's fused layout)")
