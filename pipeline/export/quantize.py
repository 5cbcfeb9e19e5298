"""Int8 dynamic quantization of the exported LM for CPU inference, with its accuracy cost.

onnxruntime's `quantize_dynamic` is used rather than torch's eager `quantize_dynamic`: the
artifact users ship to CPU inference is the ONNX graph, onnxruntime has int8 MatMul kernels
for every CPU it runs on, and the torch eager path is deprecated in favour of torchao. Weights
of every MatMul/Gemm whose weight is an initializer become int8 with per-channel scales (an
untied head: one scale per vocabulary entry); activations are quantized on the fly. The token
embedding stays fp32: onnxruntime quantizes a Gather's table with ONE scale for the whole
matrix, so one large row (an outlier token, common after training) coarsened every other row,
and with a tied head every logit. A tied head's MatMul reads the shared table through a
Transpose, which onnxruntime leaves unquantized, so that matrix stays fp32 once, not twice.
The accuracy change is measured, not assumed: the fp32 and the int8 graph are scored on the
same validation rows with the same loss function the evaluate stage uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.schema import EvalConfig
from pipeline.data.shard_store import read_split
from pipeline.evaluation.lm import perplexity, split_loss
from pipeline.export.onnx_export import check_context

# protobuf cannot hold more than 2 GiB in one file; bigger graphs keep their weights beside it
_EXTERNAL_DATA_BYTES = 1 << 30


def quantize_int8(fp32: Path, out: Path) -> Path:
    """Write the int8 graph of `fp32` (and its weights file for large models) to `out`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = sum(f.stat().st_size for f in fp32.parent.glob(fp32.name + "*"))
    # It logs a root-logger warning asking for onnxruntime's shape pre-processing, whose symbolic
    # shape inference cannot complete on torch.export graphs; the accuracy check below stands in.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    # reduce_range: 7-bit weights. On CPUs without VNNI (AVX2 only) onnxruntime's u8 x s8 kernel adds pairs of
    # products in int16, which saturates with 8-bit weights: logits 0.08-0.29 off where VNNI gave < 0.05
    # (tests/test_serving.py); the graph may be served on any CPU, so always
    try:
        quantize_dynamic(model_input=str(fp32), model_output=str(out), weight_type=QuantType.QInt8,
                         per_channel=True, reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=weights > _EXTERNAL_DATA_BYTES)
    finally:
        root.setLevel(level)
    return out


class OnnxLM(torch.nn.Module):
    """An onnxruntime session behind the `model(tokens) -> logits` call evaluation expects."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        super().__init__()
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_context(self.session, tokens)  # a longer sequence: one line naming the context
        return torch.from_numpy(self.session.run(None, {self.input: tokens.numpy()})[0])


def accuracy_change(fp32: Path, int8: Path, shards: Path, rows: int, batch: int = 16) -> dict[str, Any]:
    """Validation loss and perplexity of both graphs on the same first `rows` validation rows
    (fewer where the split has fewer; in batches of `batch`, the last one what is left), their
    difference, the largest logit difference on one batch, and the file-size ratio."""
    a, b = OnnxLM(fp32), OnnxLM(int8)
    batches = EvalConfig(batch_size=min(rows, batch), max_batches=-(-rows // min(rows, batch)))
    loss_a, loss_b = (split_loss(m, shards, "val", batches, rows=rows) for m in (a, b))
    probe = torch.from_numpy(read_split(shards, "val", 1)["tokens"][:, :-1].astype(np.int64))
    logit_diff = float(np.abs(a(probe).numpy() - b(probe).numpy()).max())

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))

    return {"fp32_val_loss": loss_a, "int8_val_loss": loss_b,
            "fp32_val_perplexity": perplexity(loss_a), "int8_val_perplexity": perplexity(loss_b),
            "int8_val_perplexity_change": perplexity(loss_b - loss_a) - 1.0,  # ppl_b / ppl_a - 1 (inf, not a crash)
            "int8_max_abs_logit_diff": logit_diff, "int8_size_ratio": size(int8) / size(fp32)}
