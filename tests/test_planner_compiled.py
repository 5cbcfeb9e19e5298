"""The memory planner under `trainer.compile`: its trace of inductor's own graphs
(`pipeline/distributed/planner/compiled.py`) against the bytes inductor's CPU code really
allocates, counted by the profiler for one compiled forward + backward."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import validate
from tests.conftest import tiny_raw
from tests.test_planner import SMALL


def _allocated(spec: dict, trainer, autocast: torch.dtype | None, batch: int) -> tuple[int, int]:
    """(peak, end) bytes the CPU allocator holds for one compiled step of real tensors, beyond
    the parameters: every allocation and free the profiler records, in order."""
    from torch.profiler import ProfilerActivity, profile

    from pipeline.distributed.activation import apply_activation_checkpointing
    from pipeline.distributed.compile import apply_compile
    from pipeline.tasks import task_for_data

    torch._dynamo.reset()
    torch.manual_seed(0)
    task = task_for_data("text")
    model = task.build(spec)
    apply_activation_checkpointing(model, trainer.activation_checkpointing, trainer.ac_selective, trainer.ac_every_k)
    apply_compile(model, trainer.compile)
    if trainer.compile_loss:
        task.compile_loss()
    x = torch.randint(0, spec["vocab_size"], (batch, spec["max_seq_len"]))
    for _ in range(2):  # the first step compiles
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = task.loss(model, {"x": x, "y": x}, None)
            loss.backward()
    torch._dynamo.reset()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak, now


@pytest.mark.parametrize(("compile_mode", "ac", "autocast", "vocab"), [
    ("blocks", "none", None, 2048),
    ("blocks", "op", None, 8192),
    ("blocks", "none", torch.bfloat16, 8192),
    ("blocks", "none", None, 32768),
    ("model", "none", None, 2048),
], ids=["blocks", "blocks-op-checkpointing", "blocks-bf16-loss", "blocks-large-vocabulary", "model"])
def test_planner_compiled_trace_equals_inductor_allocations(compile_mode, ac, autocast, vocab):
    """The planner's trace of a compiled step (blocks or the whole model, and the loss) peaks at
    and ends with what inductor's generated CPU code allocates, within 0.5%; the eager trace of
    the same step is well above (inductor saves less and fuses the logits' fp32 upcast away)."""
    from pipeline.config.schema import GPTConfig, TrainerConfig
    from pipeline.distributed.planner.trace import _run_fake

    spec = {"task": "lm", "model": GPTConfig(d_model=256, n_layers=3, n_heads=4).model_dump(), "vocab_size": vocab,
            "max_seq_len": 128}
    checkpointing = {"activation_checkpointing": "selective", "ac_selective": "op"} if ac == "op" else {}
    trainer = TrainerConfig(compile=compile_mode, compile_loss=True, **checkpointing)
    _, traced = _run_fake("text", spec, trainer, torch.float32, autocast, "cpu", 4)
    _, eager = _run_fake("text", spec, TrainerConfig(**checkpointing), torch.float32, autocast, "cpu", 4)
    peak, end = _allocated(spec, trainer, autocast, 4)
    assert abs(max(traced.live) - peak) <= 0.005 * peak, (max(traced.live), peak)
    assert abs(traced.live[-1] - end) <= 0.005 * end, (traced.live[-1], end)
    assert max(eager.live) > 1.03 * peak
    assert set(traced.phase.tolist()) == {0, 1, 2}  # block forward and backward seen, compiled or not


def test_planner_traces_whole_block_checkpointing_eagerly_under_compile():
    """Full checkpointing under compile keeps the eager trace (its compiled replay fell short of
    inductor's allocations), and the plan says so."""
    from pipeline.distributed.planner import plan

    raw = [*SMALL, "tasks.lm.trainer.activation_checkpointing=full"]
    eager = plan(validate(tiny_raw(raw)), "lm", workers=2)
    compiled = plan(validate(tiny_raw([*raw, "tasks.lm.trainer.compile=blocks"])), "lm", workers=2)
    assert compiled.total == eager.total
    assert any("traced eagerly" in n for n in compiled.notes), compiled.notes


def test_planner_plans_the_compiled_step_and_leaves_dynamo_clean():
    """With compiled blocks and loss the plan is smaller than eager's (fewer saved tensors, no
    fp32 logits), and no compiled code of the planner's stays behind for a real compile to
    reuse or to read a dynamic batch dimension from."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from pipeline.distributed.planner import plan
    from pipeline.models.gpt import Block

    eager = plan(validate(tiny_raw(SMALL)), "lm", workers=2)
    compiled = plan(validate(tiny_raw([*SMALL, "tasks.lm.trainer.compile=blocks"])), "lm", workers=2)
    assert compiled.total < eager.total
    assert not any("compile" in n for n in eager.notes)
    assert _debug_get_cache_entry_list(Block.forward.__code__) == []


def test_planner_falls_back_to_the_eager_trace_when_inductor_cannot_be_traced(monkeypatch):
    """The compiled trace leans on inductor internals; where this torch's differ, the plan is the
    eager one, with a note naming the error, rather than a failed train stage."""
    from pipeline.distributed.planner import compiled, plan

    def changed(*_args, **_kwargs):
        raise AttributeError("module 'torch._inductor.lowering' has no attribute 'fallbacks'")

    monkeypatch.setattr(compiled, "written_nodes", changed)
    monkeypatch.setattr("pipeline.distributed.planner.trace._PROFILE_CACHE", {})  # (no profile of another test)
    eager = plan(validate(tiny_raw(SMALL)), "lm", workers=2)
    fallen = plan(validate(tiny_raw([*SMALL, "tasks.lm.trainer.compile=blocks"])), "lm", workers=2)
    assert fallen.total == eager.total
    assert any("could not be traced" in n and "fallbacks" in n for n in fallen.notes), fallen.notes
