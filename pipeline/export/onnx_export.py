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


def export_onnx(model: torch.nn.Module, spec: dict[str, Any], path: Path) -> float:
    """Write `path` and return the max abs difference between onnxruntime and PyTorch outputs."""
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
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(*inputs).numpy()
    got = sess.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    return float(np.abs(got - expected).max())
