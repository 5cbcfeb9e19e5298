"""precision.dtype=fp8: refused before any resource where the hardware has no float8, and the
Linear layers it converts (the blocks' large ones) chosen from outside the model. The float8
kernels themselves run in tests/gpu (Hopper)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pipeline.config import validate
from pipeline.config.schema import GPTConfig
from pipeline.distributed import preflight
from pipeline.distributed.precision import Precision, fp8_module_filter
from pipeline.models.gpt import GPT
from tests.conftest import tiny_raw

NO_FP8 = r"^precision\.dtype: fp8 needs a GPU with float8 tensor cores \(compute capability 8\.9 or newer"


def test_fp8_is_refused_on_cpu_in_one_line():
    cfg = validate(tiny_raw(["precision.dtype=fp8"]))
    with pytest.raises(ValueError, match=NO_FP8 + r".*this run trains on CPUs \(cluster.use_gpu is false\)") as e:
        preflight(cfg, use_gpu=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=NO_FP8 + r".*this run trains on CPU"):
        Precision("fp8", torch.device("cpu"))  # and in a worker, should one get there
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=NO_FP8 + r".*this machine has no CUDA device"):
            Precision("fp8", torch.device("cuda", 0))


def test_fp8_needs_ddp_or_fsdp_without_tensor_parallel():
    with pytest.raises(ValueError, match=r"precision.dtype: fp8 runs with strategy ddp or fsdp \(got deepspeed\)"):
        preflight(validate(tiny_raw(["precision.dtype=fp8", "strategy.name=deepspeed"])), use_gpu=True)
    with pytest.raises(ValueError, match=r"fp8 cannot combine with parallel.tp"):
        preflight(validate(tiny_raw(["precision.dtype=fp8", "parallel.tp=2", "cluster.num_workers=2"])),
                  use_gpu=True)
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(ValueError, match=r"precision.dtype: fp8 needs torchao"):
            preflight(validate(tiny_raw(["precision.dtype=fp8"])), use_gpu=True)


def _gpt(mlp_hidden: int, vocab: int = 2048) -> GPT:
    with torch.device("meta"):  # the loop converts before the strategy materialises
        return GPT(GPTConfig(d_model=512, n_layers=2, n_heads=8, mlp_hidden=mlp_hidden), vocab, 64)


def test_fp8_module_filter_picks_the_large_block_linears():
    model = _gpt(mlp_hidden=1536)
    keep = fp8_module_filter(model)
    chosen = sorted(n for n, m in model.named_modules() if keep(m, n))
    # 512 -> 1536 (w1, w3) convert; 512 -> 512 attention projections and 1536 -> 512 (w2) are small
    # (in <= 4096 and out <= 1024); the head (512 -> 2048) is outside the blocks
    assert chosen == [f"blocks.{i}.mlp.{w}" for i in range(2) for w in ("w1", "w3")]
    assert not keep(model.head, "head") and not keep(model.blocks[0].norm1, "blocks.0.norm1")
    odd = _gpt(mlp_hidden=1544)  # not a multiple of 16: float8 GEMMs cannot take it
    assert not any(fp8_module_filter(odd)(m, n) for n, m in odd.named_modules())


def test_fp8_conversion_swaps_only_the_filtered_layers():
    pytest.importorskip("torchao.float8", reason="torchao is the [gpu] extra")
    from torchao.float8.float8_linear import Float8Linear

    from pipeline.distributed.precision import convert_to_fp8

    model = _gpt(mlp_hidden=1536)
    names = list(model.state_dict())
    weights = {n: p for n, p in model.named_parameters()}
    assert convert_to_fp8(model) == 4
    assert sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear)) == \
        [f"blocks.{i}.mlp.{w}" for i in range(2) for w in ("w1", "w3")]
    assert list(model.state_dict()) == names  # checkpoints and export see the same names
    assert all(p is weights[n] for n, p in model.named_parameters())  # same parameters: sharded init applies
