"""ONNX export with torch.export (dynamo), verified against onnxruntime on a fixed input."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


def example_inputs(model: torch.nn.Module, spec: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    if spec["task"] == "lm":
        return (torch.randint(0, spec["vocab_size"], (2, min(16, spec["max_seq_len"])), generator=g),)
    c, h, w = spec["image_shape"]
    return (torch.randn(2, c, h, w, generator=g), torch.tensor([10, 500]), torch.tensor([0, 1]))


# The language model graph's metadata_props: what a runtime needs that the graph's shapes do not
# say (the sequence axis is symbolic, and a longer input fails deep in onnxruntime with a broadcast
# error naming no context), and how a completion ends.
CONTEXT, VOCAB, EOS_ID = "max_seq_len", "vocab_size", "eos_token_id"


def lm_metadata(spec: dict[str, Any], eos_id: int | None) -> dict[str, str]:
    """The metadata_props recorded in a language model's graph (ONNX holds them as strings)."""
    props = {CONTEXT: str(spec["max_seq_len"]), VOCAB: str(spec["vocab_size"])}
    return props if eos_id is None else {**props, EOS_ID: str(eos_id)}


def record_metadata(path: Path, props: dict[str, str]) -> None:
    """Set `props` in the graph at `path`, its external weights file (model.onnx.data) left as it is."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    kept = [p for p in graph.metadata_props if p.key not in props]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for key, value in props.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def check_context(session: Any, tokens: Any) -> None:
    """One line naming the context when `tokens` (batch, seq) is longer than the graph's recorded
    `max_seq_len`, before onnxruntime's broadcast error on the position table; a graph without
    the record (exported before it) is run as it is."""
    context = session.get_modelmeta().custom_metadata_map.get(CONTEXT)
    if context is not None and tokens.shape[-1] > int(context):
        raise ValueError(f"tokens: a sequence of {tokens.shape[-1]} tokens is longer than the model's context "
                         f"(max_seq_len {context}); crop it to the last {context}")


def _folder_eos(folder: Path) -> int | None:
    """The end-of-document id of the export folder the graph is written into (its tokenizer.json
    and generation.json, written before the graph), as the served model finds it; None without one."""
    if not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    from pipeline.export.pyfunc import end_of_document

    return end_of_document(folder, Tokenizer.from_file(str(folder / "tokenizer.json")))


def export_onnx(model: torch.nn.Module, spec: dict[str, Any], path: Path, eos_id: int | None = None) -> float:
    """Write `path` and return the max abs difference between onnxruntime and PyTorch outputs.
    A language model's graph records its context, vocabulary size and end-of-document id
    (`lm_metadata`; the id, unless given, from the tokenizer in `path`'s folder)."""
    import onnxruntime as ort

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    inputs = example_inputs(model, spec)
    batch = torch.export.Dim("batch", min=1, max=1024)
    if spec["task"] == "lm":
        names = ["tokens"]
        shapes = ({0: batch, 1: torch.export.Dim("seq", min=2, max=spec["max_seq_len"])},)
    else:
        names = ["x", "t", "y"]
        shapes = ({0: batch}, {0: batch}, {0: batch})
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=True, input_names=names, output_names=["out"],
                          dynamic_shapes=shapes, verbose=False)
    if spec["task"] == "lm":
        record_metadata(path, lm_metadata(spec, _folder_eos(path.parent) if eos_id is None else eos_id))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if spec["task"] == "lm":
        check_context(sess, inputs[0])
    with torch.no_grad():
        expected = model(*inputs).numpy()
    got = sess.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    return float(np.abs(got - expected).max())
