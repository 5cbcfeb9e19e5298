"""Activation checkpointing, optimizer kernel choice, and the driver's pre-flight checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipeline.config import validate
from pipeline.config.schema import DiffusionProcessConfig, DiTConfig, GPTConfig, OptimConfig, UNetConfig
from pipeline.distributed import preflight
from pipeline.distributed.activation import apply_activation_checkpointing
from pipeline.models.dit import DiT
from pipeline.models.gpt import GPT
from pipeline.models.unet import UNet
from pipeline.training.optim import build_optimizer, check_kernels, describe_optimizer
from tests.conftest import tiny_raw


def _gpt() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(d_model=32, n_layers=4, n_heads=4, dropout=0.1), vocab_size=50, max_seq_len=16)
    m.init_weights()
    return m


def _grads(model: torch.nn.Module, run) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(1)  # dropout masks: checkpointing must replay the same ones
    run(model).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _gpt_loss(m):
    x = torch.arange(32).reshape(2, 16) % 50
    return torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten())


@pytest.mark.parametrize(("mode", "selective", "wrapped"),
                         [("full", "every_k", 4), ("selective", "every_k", 2), ("selective", "attention", 4),
                          ("selective", "op", 4)])
def test_activation_checkpointing_gives_the_same_gradients(mode, selective, wrapped):
    ref_model = _gpt()
    ckpt_model = copy.deepcopy(ref_model)
    assert apply_activation_checkpointing(ckpt_model, mode, selective, every_k=2) == wrapped
    assert ckpt_model.state_dict().keys() == ref_model.state_dict().keys()  # checkpoints stay compatible
    ref, got = _grads(ref_model, _gpt_loss), _grads(ckpt_model, _gpt_loss)
    names = dict(zip(ref, got, strict=True))  # wrapped parameter names carry the wrapper's prefix
    for k, k2 in names.items():
        torch.testing.assert_close(got[k2], ref[k], rtol=0, atol=0, msg=k)


def test_activation_checkpointing_by_op_keeps_less_than_none_more_than_full():
    """`ac_selective=op` keeps each block's attention and every other matmul output: the live
    bytes of a real step (the planner's counter on real CPU tensors) peak below no checkpointing
    and above full checkpointing, and the kept outputs are what the policy names."""
    import torch.nn.functional as F

    from pipeline.distributed.activation import SAVED_OPS, _policy
    from pipeline.distributed.planner.trace import _LiveBytes

    cfg = GPTConfig(d_model=128, n_layers=4, n_heads=4)
    peaks = {}
    for mode, selective in (("none", "every_k"), ("selective", "op"), ("full", "every_k")):
        torch.manual_seed(0)
        model = GPT(cfg, 64, 64)
        apply_activation_checkpointing(model, mode, selective)
        x = torch.zeros(8, 64, dtype=torch.long)
        live = _LiveBytes({t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]})
        with live:
            F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        peaks[mode] = max(live.samples)
    assert peaks["none"] > peaks["selective"] > peaks["full"], peaks

    class Ctx:
        is_recompute = False

    from torch.utils.checkpoint import CheckpointPolicy

    counts: dict[str, int] = {"forward": 0, "recompute": 0}
    mm = torch.ops.aten.mm.default
    assert [_policy(counts, Ctx(), mm) for _ in range(4)] == [CheckpointPolicy.MUST_SAVE,
                                                             CheckpointPolicy.PREFER_RECOMPUTE] * 2
    assert _policy(counts, Ctx(), torch.ops.aten.silu.default) == CheckpointPolicy.PREFER_RECOMPUTE
    flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert flash_cpu in SAVED_OPS and _policy(counts, Ctx(), flash_cpu) == CheckpointPolicy.MUST_SAVE


def _op_ac_rank(rank: int, world: int, raws: dict, shards: str, root: str) -> dict:
    from pipeline.config import validate
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    out = {}
    for name, raw in raws.items():
        state = train(validate(raw), "lm", Path(shards), LocalSession(Path(root) / name, rank=rank, world=world))
        out[name] = [h["loss"] for h in state.history]
    return out if rank == 0 else {}


def test_activation_checkpointing_by_op_trains_like_none_under_each_strategy(built_data, tmp_path):
    """`activation_checkpointing=selective`, `ac_selective=op` on 2 gloo ranks under DDP, FSDP2
    (each checkpointed block its own unit) and DeepSpeed ZeRO-3 (its parameter gathers inside the
    checkpointed region): 6 fp32 steps equal DDP without checkpointing."""
    from pipeline.distributed import VARIANTS
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    steps = ["tasks.lm.trainer.max_steps=6", "tasks.lm.trainer.log_every=1", "tasks.lm.trainer.ckpt_every=6",
             "tasks.lm.trainer.prefetch_batches=0"]
    op = ["tasks.lm.trainer.activation_checkpointing=selective", "tasks.lm.trainer.ac_selective=op"]
    raws = {"reference": tiny_raw(steps + VARIANTS["ddp"]),
            **{name: tiny_raw(steps + VARIANTS[name] + op) for name in ("ddp", "fsdp", "zero3")}}
    losses = run_group(_op_ac_rank, 2, raws, str(shards["lm"]), str(tmp_path))[0]
    ref = losses.pop("reference")
    assert len(ref) == 6
    for name, got in losses.items():
        worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got, strict=True))
        assert worst < 1e-5, f"{name} with op-level checkpointing differs from DDP by {worst:.2e} relative"


def test_activation_checkpointing_on_diffusion_models():
    torch.manual_seed(0)
    proc = DiffusionProcessConfig()
    for model in (DiT(DiTConfig(d_model=32, depth=2, n_heads=4, diffusion=proc), (1, 8, 8), 10),
                  UNet(UNetConfig(base_channels=8, diffusion=proc), (1, 8, 8), 10)):
        model.init_weights()

        def loss(m):
            x = torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8)
            return m(x, torch.tensor([3, 500]), torch.tensor([1, 2])).square().mean()

        ref = _grads(model, loss)
        for mode, selective in (("full", "every_k"), ("selective", "op")):  # op: the U-Net's convs are recomputed
            wrapped = copy.deepcopy(model)
            assert apply_activation_checkpointing(wrapped, mode, selective) > 0
            got = _grads(wrapped, loss)
            for a, b in zip(ref.values(), got.values(), strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"attn"):  # the U-Net has no attention modules to pick
        apply_activation_checkpointing(UNet(UNetConfig(base_channels=8, diffusion=proc), (1, 8, 8), 10),
                                       "selective", "attention")


def test_optimizer_implementation_is_chosen_and_named():
    model = _gpt()
    # (torch's default on CPU parameters is the per-parameter loop: what runs is what is named)
    assert describe_optimizer(build_optimizer(model, OptimConfig(impl="auto"))) == "torch AdamW (for-loop (default))"
    assert describe_optimizer(build_optimizer(model, OptimConfig(impl="fused"))) == "torch AdamW (fused)"
    assert describe_optimizer(build_optimizer(model, OptimConfig(impl="torch"))) == "torch AdamW (for-loop)"
    assert describe_optimizer(build_optimizer(model, OptimConfig(name="sgd"))) == "torch SGD (for-loop (default))"


def test_fused_adamw_steps_like_the_reference():
    a, b = _gpt(), _gpt()
    oa, ob = build_optimizer(a, OptimConfig(impl="torch")), build_optimizer(b, OptimConfig(impl="fused"))
    for model, opt in ((a, oa), (b, ob)):
        _grads(model, _gpt_loss)
        opt.step()
    for (k, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=k)


def test_apex_asked_for_without_apex_is_a_clear_error():
    """Apex is not installable on these machines: the error path is what their users meet."""
    if __import__("importlib").util.find_spec("apex") is not None:
        pytest.skip("apex is installed: the error path does not apply")
    with pytest.raises(ValueError, match=r"optim.impl: 'apex' was asked for"):
        build_optimizer(_gpt(), OptimConfig(impl="apex"))
    with pytest.raises(ValueError, match=r"tasks.lm.model.norm_impl: 'apex'"):
        check_kernels(validate(tiny_raw(["tasks.lm.model.norm_impl=apex"])))
    with pytest.raises(ValueError, match=r"impl 'apex' applies to adam and adamw"):
        OptimConfig(name="sgd", impl="apex")


def test_backend_specific_config_errors_name_the_key():
    from pipeline.config.loading import ConfigError

    with pytest.raises(ConfigError, match=r"strategy: offload_params needs zero_stage 3"):
        validate(tiny_raw(["strategy.name=deepspeed", "strategy.zero_stage=2", "strategy.offload_params=true"]))
    # EMA under ZeRO-3 is allowed now (a sharded EMA: tests/test_sharded.py)
    validate(tiny_raw(["strategy.name=deepspeed", "strategy.zero_stage=3", "tasks.diffusion.trainer.ema_decay=0.99"]))
    with pytest.raises(ConfigError, match=r"strategy.zero_stage"):
        validate(tiny_raw(["strategy.name=fsdp", "strategy.zero_stage=1"]))
    with pytest.raises(ConfigError, match=r"tasks.lm.trainer.activation_checkpointing"):
        validate(tiny_raw(["tasks.lm.trainer.activation_checkpointing=some"]))


def test_deepspeed_fp16_on_a_cpu_without_fp16_is_refused_before_training():
    from pipeline.distributed.deepspeed import cpu_fp16_supported

    cfg = validate(tiny_raw(["strategy.name=deepspeed", "precision.dtype=fp16"]))
    if cpu_fp16_supported():
        preflight(cfg, use_gpu=False)  # this CPU has AVX512-FP16: DeepSpeed accepts it
    else:
        with pytest.raises(ValueError, match=r"precision.dtype: DeepSpeed's fp16 on CPU needs"):
            preflight(cfg, use_gpu=False)
    preflight(cfg, use_gpu=True)  # on GPUs it is DeepSpeed's normal fp16


def test_training_setup_line_names_the_selective_checkpointing(built_data, tmp_path, capsys):
    """The one line a run prints at start said `activation_checkpointing: selective` without
    which blocks or modules are recomputed (trainer.ac_selective, and k for every_k)."""
    from pipeline.distributed.activation import describe_activation_checkpointing as describe
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    assert describe("selective", "attention", 2) == "selective (attention)"
    assert describe("selective", "op", 2) == "selective (op)"
    assert describe("selective", "every_k", 3) == "selective (every_k, k=3)"
    assert describe("full", "attention", 2) == "full" and describe("none", "op", 2) == "none"  # (not applied)

    _, shards = built_data
    k = "tasks.lm.trainer"
    cfg = validate(tiny_raw([f"{k}.max_steps=1", f"{k}.ckpt_every=1", f"{k}.activation_checkpointing=selective",
                             f"{k}.ac_selective=attention"]))
    train(cfg, "lm", shards["lm"], LocalSession(tmp_path))
    setup = next(line for line in capsys.readouterr().out.splitlines() if "activation_checkpointing: " in line)
    assert "; activation_checkpointing: selective (attention); compile: " in setup, setup
