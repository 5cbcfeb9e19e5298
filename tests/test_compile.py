"""torch.compile (`trainer.compile`) on CPU with inductor, against eager, on 2 real gloo ranks.

One spawned group of 2 ranks trains, in order: the GPT under DDP eagerly and with compile=blocks
(10 fp32 steps, a checkpoint at step 5), a resume of the compiled run from that checkpoint, the GPT
with compile=model, the DiT eagerly and with compile=blocks, then the GPT eagerly and with
compile=blocks under FSDP2 with whole-block activation checkpointing and under DeepSpeed ZeRO-2.
Compiled code is shared inside each process (the resumed run compiles nothing new). The tests
compare per-step losses (within 1e-5 relative), resumed against uninterrupted weights, state-dict
keys, and the reported compile time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import validate
from pipeline.config.loading import ConfigError
from tests.conftest import tiny_raw

STEPS = ["log_every=1", "ckpt_every=5", "keep_last_k=5", "prefetch_batches=0", "max_steps=10", "ema_decay=0"]
LM = [f"tasks.lm.trainer.{s}" for s in STEPS]
DIT = [f"tasks.diffusion.trainer.{s}" for s in STEPS]
FSDP_AC = ["strategy.name=fsdp", "tasks.lm.trainer.activation_checkpointing=full"]
ZERO2 = ["strategy.name=deepspeed", "strategy.zero_stage=2"]
RUNS = {  # name -> (task, trainer.compile, further overrides)
    "lm_eager": ("lm", "none", []), "lm_blocks": ("lm", "blocks", []), "lm_model": ("lm", "model", []),
    "dit_eager": ("diffusion", "none", []), "dit_blocks": ("diffusion", "blocks", []),
    "fsdp_ac_eager": ("lm", "none", FSDP_AC), "fsdp_ac_blocks": ("lm", "blocks", FSDP_AC),
    "zero2_eager": ("lm", "none", ZERO2), "zero2_blocks": ("lm", "blocks", ZERO2),
}


def _raw(task: str, mode: str, extra: list[str]) -> dict:
    key = "lm" if task == "lm" else "diffusion"
    return tiny_raw((LM if task == "lm" else DIT) + [f"tasks.{key}.trainer.compile={mode}", *extra])


def _group(rank: int, world: int, raws: dict, shards: dict, root: str) -> dict:
    """Every run, on each rank; rank 0 returns histories, final weights and checkpoint keys."""
    import torch._inductor.config as inductor
    from safetensors.torch import load_file

    # A test-time saving only (the kernels are the same): the CPU's vector ISA is taken from its
    # flags, without inductor's dry-run builds and load probes (about 20 s on a cold cache, 3 s per
    # process on a warm one).
    inductor.cpp.vec_isa_ok = True

    from pipeline.config import validate
    from pipeline.training.checkpoint import STATE
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    def run(name: str, key: str) -> dict:
        task = RUNS[key][0]
        session = LocalSession(Path(root) / name, rank=rank, world=world)
        state = train(validate(raws[key]), task, Path(shards[task]), session)
        out = {"history": state.history}
        if rank == 0:
            with session.latest_checkpoint() as ckpt:
                out["weights"] = load_file(str(ckpt / "model.safetensors"))
                if (ckpt / STATE).exists():  # (FSDP2 and DeepSpeed write sharded checkpoints)
                    out["state_keys"] = sorted(torch.load(ckpt / STATE, weights_only=True)["model"])
        return out

    out = {name: run(name, name) for name in ("lm_eager", "lm_blocks")}
    if rank == 0:  # "kill" after step 5: a fresh run folder holding only the step-5 checkpoint
        src = Path(root) / "lm_blocks" / "checkpoint_00000005"
        shutil.copytree(src, Path(root) / "lm_resumed" / src.name)
    torch.distributed.barrier()
    out["lm_resumed"] = run("lm_resumed", "lm_blocks")
    for name in ("lm_model", "dit_eager", "dit_blocks", "fsdp_ac_eager", "fsdp_ac_blocks", "zero2_eager",
                 "zero2_blocks"):
        out[name] = run(name, name)
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def runs(built_data, tmp_path_factory):
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    raws = {name: _raw(*spec) for name, spec in RUNS.items()}
    root = tmp_path_factory.mktemp("compile")
    return run_group(_group, 2, raws, {k: str(v) for k, v in shards.items()}, str(root))[0]


def _assert_close(ref: dict, got: dict, what: str, weights: bool = True) -> None:
    a, b = [h["loss"] for h in ref["history"]], [h["loss"] for h in got["history"]]
    assert len(a) == len(b) == 10
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    assert worst < 1e-5, f"{what}: per-step loss differs from eager by {worst:.2e} relative"
    for k, v in ref["weights"].items() if weights else ():
        torch.testing.assert_close(got["weights"][k], v, rtol=1e-4, atol=1e-5, msg=f"{what}: {k}")


def test_compile_blocks_gpt_losses_equal_eager_under_ddp(runs):
    """2 DDP ranks over gloo, compile=blocks against eager: the same losses step by step."""
    _assert_close(runs["lm_eager"], runs["lm_blocks"], "GPT, compile=blocks")


def test_compile_blocks_dit_losses_equal_eager(runs):
    """Losses only: adaLN-Zero's gates start at zero, so the blocks' gradients start at zero and
    stay near rounding level for the first steps, where Adam turns them into steps of the whole
    learning rate whatever their size: single weights differ by up to one such step (measured
    1e-3 after 3 steps), while the losses agree."""
    _assert_close(runs["dit_eager"], runs["dit_blocks"], "DiT, compile=blocks", weights=False)


def test_compile_blocks_gpt_losses_equal_eager_under_fsdp2_with_checkpointing(runs):
    """FSDP2 with whole-block activation checkpointing: each checkpointed block compiled (the
    recomputation inside the graph) before `fully_shard`, against the same eager run."""
    _assert_close(runs["fsdp_ac_eager"], runs["fsdp_ac_blocks"], "GPT, FSDP2 + full AC, compile=blocks")


def test_compile_blocks_gpt_losses_equal_eager_under_zero2(runs):
    """DeepSpeed ZeRO-2 takes the module compiled in place (the configuration allows 0-2)."""
    _assert_close(runs["zero2_eager"], runs["zero2_blocks"], "GPT, ZeRO-2, compile=blocks")


def test_compile_model_gpt_losses_equal_eager(runs):
    _assert_close(runs["lm_eager"], runs["lm_model"], "GPT, compile=model")


def test_compile_resume_equals_uninterrupted(runs):
    """A fresh (recompiled) loop resuming the compiled run at step 5 ends on its exact weights."""
    straight, resumed = runs["lm_blocks"], runs["lm_resumed"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    for k, v in straight["weights"].items():
        assert torch.equal(v, resumed["weights"][k]), f"{k} differs after resume"


def test_compile_keeps_state_dict_keys(runs):
    """In-place compilation: checkpoints and exported weights carry the eager names (no `_orig_mod.`)."""
    for name in ("lm_blocks", "lm_model", "dit_blocks"):
        eager = runs[name.split("_")[0] + "_eager"]
        assert runs[name]["state_keys"] == eager["state_keys"], name
        assert runs[name]["weights"].keys() == eager["weights"].keys(), name
        assert not any("_orig_mod" in k for k in runs[name]["state_keys"]), name


def test_compile_time_reported_once(runs):
    """`compile_s` (the first step, compilation included) is in the first history entry only."""
    for name in ("lm_blocks", "lm_model", "dit_blocks", "lm_resumed", "fsdp_ac_blocks", "zero2_blocks"):
        timed = [h for h in runs[name]["history"] if "compile_s" in h]
        assert len(timed) == (2 if name == "lm_resumed" else 1), name  # resumed: the original run's and its own
        assert timed[-1]["compile_s"] > 0
    resumed = [h["step"] for h in runs["lm_resumed"]["history"] if "compile_s" in h]
    assert resumed == [1, 6]
    for name in ("lm_eager", "fsdp_ac_eager", "zero2_eager"):
        assert not any("compile_s" in h for h in runs[name]["history"]), name


def test_compile_refused_where_it_cannot_run(monkeypatch):
    """Before any Ray resource: ZeRO-3 (its parameters exist only inside DeepSpeed's hooks), an
    unknown mode, and CPU compilation without a C++ compiler. ZeRO 0-2 compile like DDP."""
    from pipeline.distributed import preflight

    with pytest.raises(ConfigError, match=r"^tasks.lm.trainer.compile=blocks cannot combine with "
                                          r"strategy.zero_stage=3 \(deepspeed\)"):
        validate(tiny_raw(["strategy.name=deepspeed", "strategy.zero_stage=3", "tasks.lm.trainer.compile=blocks"]))
    validate(tiny_raw(["strategy.name=deepspeed", "strategy.zero_stage=2", "tasks.lm.trainer.compile=blocks"]))
    with pytest.raises(ConfigError, match=r"tasks.lm.trainer.compile: Input should be 'none', 'blocks' or 'model'"):
        validate(tiny_raw(["tasks.lm.trainer.compile=all"]))
    cfg = validate(tiny_raw(["tasks.diffusion.trainer.compile=model"]))
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(ValueError, match=r"tasks.diffusion.trainer.compile=model: torch.compile on CPU builds C\+\+ "
                                         r"kernels, and no-such-c\+\+ is not on PATH"):
        preflight(cfg, use_gpu=False)


@pytest.fixture
def fast_inductor():
    """The CPU's vector ISA from its flags (see `_group`): a test-time saving, same kernels."""
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.vec_isa_ok": True}):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_compile_loss_equals_eager_cross_entropy(fast_inductor, dtype, smoothing):
    """The lm task's compiled loss (`trainer.compile_loss`) against the eager one: the same value
    and the same gradient of the logits, in their own dtype, with and without label smoothing."""
    from pipeline.tasks.lm import LanguageModeling

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 16, 96, generator=g)).to(dtype)
    target = torch.randint(0, 96, (2, 16), generator=g)
    eager, compiled = LanguageModeling(), LanguageModeling()
    compiled.compile_loss()
    results = []
    for task in (eager, compiled):
        x = logits.clone().requires_grad_()
        loss = task.output_loss(x, target, smoothing)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (ref, ref_grad), (got, got_grad) = results
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the gradient, either way
    torch.testing.assert_close(got_grad, ref_grad, rtol=tol, atol=tol / 100)


def _bytes_allocated(fn) -> int:
    """Every byte allocated on the CPU while `fn` runs (the profiler's per-operator allocations,
    inductor's kernels included; frees are not subtracted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def test_compile_loss_never_materialises_fp32_logits(fast_inductor):
    """bf16 logits of 512 tokens x 8192 classes (8 MiB; 16 MiB in fp32): the eager loss allocates
    several fp32 copies in forward and backward (upcast, log-softmax, their gradients), the
    compiled one nothing of fp32 size, only the logits' bf16 gradient."""
    from pipeline.tasks.lm import LanguageModeling

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 256, 8192, generator=g).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 8192, (2, 256), generator=g)
    fp32_bytes = logits.numel() * 4
    compiled = LanguageModeling()
    compiled.compile_loss()
    allocated = {}
    for name, task in (("eager", LanguageModeling()), ("compiled", compiled)):
        def step(task=task) -> None:
            task.output_loss(logits, target).backward()
        step()  # (compilation, outside the measurement)
        logits.grad = None
        allocated[name] = _bytes_allocated(step)
        logits.grad = None
    assert allocated["eager"] >= 3 * fp32_bytes, allocated  # the check can see fp32 copies
    assert allocated["compiled"] < fp32_bytes, allocated
    assert allocated["compiled"] >= logits.numel() * 2, allocated  # the bf16 gradient itself


def test_compile_blocks_with_op_checkpointing_gives_eager_gradients(fast_inductor):
    """compile=blocks over blocks checkpointed by operator (`ac_selective=op`: the policy runs while
    dynamo traces, and inductor's partitioner keeps what it names): the gradients of two steps'
    forward + backward equal the eager, uncheckpointed model's."""
    import copy

    import torch.nn.functional as F

    from pipeline.config.schema import GPTConfig
    from pipeline.distributed.activation import apply_activation_checkpointing
    from pipeline.distributed.compile import apply_compile
    from pipeline.models.gpt import GPT

    torch.manual_seed(0)
    eager = GPT(GPTConfig(d_model=64, n_layers=3, n_heads=4), 256, 32)
    compiled = copy.deepcopy(eager)
    assert apply_activation_checkpointing(compiled, "selective", "op") == 3
    apply_compile(compiled, "blocks")
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        for _ in range(2):  # the second call runs the compiled graphs, not the compilation
            model.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
