"""Tensor and pipeline parallelism on real gloo ranks, proven equal to DDP step by step.

Every layout trains the tiny GPT for 20 fp32 steps from the same seed and data order; its
per-step losses must equal a DDP run's within 1e-5 relative: TP=2, PP=2 under each schedule,
FSDP2 x TP on a 2 x 2 mesh, and PP=2 x DP=2. The pipeline runs use 2 gradient-accumulation
micro-batches against DDP's single big batch, so they also show that accumulation equals the
big batch. Checkpoints are DCP: resuming within a layout is bit-exact, and a checkpoint one
layout wrote loads under another with equal weights; the exported safetensors are exactly what
DDP writes for the same weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.distributed import LAYOUT_VARIANTS, VARIANTS
from tests.conftest import tiny_raw

STEPS = ["tasks.lm.trainer.max_steps=20", "tasks.lm.trainer.log_every=1", "tasks.lm.trainer.ckpt_every=10",
         "tasks.lm.trainer.keep_last_k=5", "tasks.lm.trainer.eval_every=10", "tasks.lm.trainer.eval_batches=1",
         "tasks.lm.trainer.prefetch_batches=0"]
ACCUM2 = ["tasks.lm.trainer.grad_accum_steps=2"]
LAYOUTS: dict[str, tuple[int, list[str]]] = {  # name -> (ranks, overrides)
    "ddp": (2, VARIANTS["ddp"]),
    "tp2": (2, LAYOUT_VARIANTS["tp2"]),
    "pp2_gpipe": (2, LAYOUT_VARIANTS["pp2"] + ACCUM2 + ["parallel.pp_schedule=gpipe"]),
    "pp2_1f1b": (2, LAYOUT_VARIANTS["pp2"] + ACCUM2 + ["parallel.pp_schedule=1f1b"]),
    # interleaved: 2 ranks x 2 stages each (rank 0: blocks 0 and 2, rank 1: blocks 1 and 3)
    "ddp_4l": (2, [*VARIANTS["ddp"], "tasks.lm.model.n_layers=4"]),
    "pp2_interleaved_1f1b": (2, LAYOUT_VARIANTS["pp2"] + ACCUM2 + ["parallel.pp_schedule=interleaved_1f1b",
                                                                  "tasks.lm.model.n_layers=4"]),
    "fsdp_tp2x2": (4, LAYOUT_VARIANTS["fsdp_tp2"] + ["cluster.num_workers=4"]),
    "pp2_dp2": (4, LAYOUT_VARIANTS["pp2"] + ACCUM2 + ["cluster.num_workers=4"]),
    # torch.compile (blocks, and the loss: the pipeline's last stage calls the compiled loss)
    "tp2_compiled": (2, LAYOUT_VARIANTS["tp2"] + ["tasks.lm.trainer.compile=blocks"]),
    # activation checkpointing by operator: the policy sees the DTensor matmuls of the split blocks
    "tp2_op_ac": (2, LAYOUT_VARIANTS["tp2"] + ["tasks.lm.trainer.activation_checkpointing=selective",
                                              "tasks.lm.trainer.ac_selective=op"]),
    "pp2_1f1b_compiled": (2, LAYOUT_VARIANTS["pp2"] + ACCUM2 + ["parallel.pp_schedule=1f1b",
                                                               "tasks.lm.trainer.compile=blocks"]),
    "tp2_pp2_bf16": (4, ["parallel.tp=2", "parallel.pp=2", "cluster.num_workers=4", "precision.dtype=bf16",
                         *ACCUM2]),
}


def _train_rank(rank: int, world: int, raw: dict, shards: str, root: str, resume: bool, task: str = "lm") -> dict:
    """Train; then (with `resume`) train again from the step-10 checkpoint into another folder."""
    import torch._inductor.config as inductor
    from safetensors.torch import load_file

    from pipeline.config import validate
    from pipeline.training.checkpoint import read_meta
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    inductor.cpp.vec_isa_ok = True  # compiled layouts: the CPU's vector ISA from its flags (test time only)

    def run(name: str) -> dict:
        session = LocalSession(Path(root) / name, rank=rank, world=world)
        state = train(validate(raw), task, Path(shards), session)
        with session.latest_checkpoint() as ckpt:
            weights = load_file(str(ckpt / "model.safetensors")) if rank == 0 else {}
            layout = read_meta(ckpt)["implementation"]["strategy"]
        return {"history": state.history, "weights": weights, "layout": layout}

    out = {"straight": run("straight")}
    if resume:
        if rank == 0:
            src = Path(root) / "straight" / "checkpoint_00000010"
            shutil.copytree(src, Path(root) / "resumed" / src.name)
        torch.distributed.barrier()
        out["resumed"] = run("resumed")
    return out


def _each(rank: int, world: int, fn, calls: list[tuple]) -> list:
    """`fn(rank, world, *args)` for each args of `calls`, one after another in one group of ranks."""
    return [fn(rank, world, *args) for args in calls]


def _train_layouts(rank: int, world: int, jobs: list[tuple[str, dict, str, bool]], shards: str) -> dict:
    """Several layouts' `_train_rank` one after another in one group of ranks (one spawn and one
    set of imports for all of them, as tests/test_strategies.py runs its strategies)."""
    return {name: _train_rank(rank, world, raw, shards, root, resume) for name, raw, root, resume in jobs}


# The layouts each test asks `runs` for (those of all its parameters): the first request trains every
# layout of its rank count that this session's selection needs, in one group.
USES = {
    "test_tensor_parallel_losses_equal_ddp": ("ddp", "tp2"),
    "test_tensor_parallel_2d_with_fsdp_losses_equal_ddp": ("ddp", "fsdp_tp2x2"),
    "test_pipeline_parallel_losses_equal_ddp": ("ddp", "ddp_4l", "pp2_gpipe", "pp2_1f1b", "pp2_interleaved_1f1b"),
    "test_model_parallel_compiled_losses_equal_ddp": ("ddp", "tp2_compiled", "pp2_1f1b_compiled"),
    "test_tensor_parallel_with_activation_checkpointing_by_op_losses_equal_ddp": ("ddp", "tp2_op_ac"),
    "test_pipeline_parallel_interleaved_exports_ddp_weights": ("ddp_4l", "pp2_interleaved_1f1b"),
    "test_pipeline_parallel_with_data_parallel_losses_equal_ddp": ("ddp", "pp2_dp2"),
    "test_tensor_parallel_and_pipeline_parallel_3d_bf16_trains_close_to_ddp_fp32": ("ddp", "tp2_pp2_bf16"),
    "test_tensor_parallel_and_pipeline_parallel_resume_is_bit_exact": ("tp2", "pp2_1f1b", "pp2_interleaved_1f1b"),
    "test_tensor_parallel_and_pipeline_parallel_export_equals_ddp_layout": ("ddp", "tp2", "pp2_1f1b", "fsdp_tp2x2"),
    "test_tensor_parallel_and_pipeline_parallel_checkpoint_loads_under_another_layout": ("tp2", "pp2_1f1b"),
}


@pytest.fixture(scope="module")
def runs(request, built_data, tmp_path_factory):
    """Each layout's run, trained once per module and shared by the tests below. The first request
    for a layout trains it together with every other layout of its rank count that the selected
    tests of this module use (`USES`), in one group of processes; the compiled layouts last."""
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    wanted = {name for item in request.session.items if item.module is request.module
              for name in USES.get(item.originalname, ())}
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            ranks = LAYOUTS[name][0]
            batch = [n for n in LAYOUTS if n == name or (n in wanted and n not in cache and LAYOUTS[n][0] == ranks)]
            batch.sort(key=lambda n: "compiled" in n)  # (stable: LAYOUTS' order otherwise)
            roots = {n: tmp_path_factory.mktemp(f"mp-{n}") for n in batch}
            jobs = [(n, tiny_raw(STEPS + LAYOUTS[n][1]), str(roots[n]),
                     n in ("tp2", "pp2_1f1b", "pp2_interleaved_1f1b")) for n in batch]
            results = run_group(_train_layouts, ranks, jobs, str(shards["lm"]), timeout_s=1800)[0]
            cache.update({n: {**results[n], "root": roots[n]} for n in batch})
        return cache[name]

    return get


def _losses(run: dict, key: str = "loss") -> list[float]:
    return [h[key] for h in run["straight"]["history"] if key in h]


def _assert_losses_equal(ref: dict, got: dict, name: str, evals: int = 2) -> None:
    _ranks, overrides = LAYOUTS.get(name, (0, []))
    for key in ("tp", "pp"):  # the layout asked for is the one that ran
        degree = next((o.split("=")[1] for o in overrides if o.startswith(f"parallel.{key}=")), None)
        if degree:
            assert f"{key}={degree}" in got["straight"]["layout"], got["straight"]["layout"]
    a, b = _losses(ref), _losses(got)
    assert len(a) == len(b) == 20
    for step, (x, y) in enumerate(zip(a, b, strict=True), 1):
        assert abs(x - y) <= 1e-5 * abs(x), f"{name}: step {step} loss {y!r} vs DDP {x!r}"
    va, vb = _losses(ref, "val_loss"), _losses(got, "val_loss")
    assert len(va) == len(vb) == evals
    for x, y in zip(va, vb, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), f"{name}: validation loss {y!r} vs DDP {x!r}"


def test_tensor_parallel_losses_equal_ddp(runs):
    _assert_losses_equal(runs("ddp"), runs("tp2"), "tp2")


def test_tensor_parallel_2d_with_fsdp_losses_equal_ddp(runs):
    """FSDP2 x TP on a 2 x 2 mesh (4 ranks): parameters sharded over dp and split over tp."""
    _assert_losses_equal(runs("ddp"), runs("fsdp_tp2x2"), "fsdp_tp2x2")


def test_tensor_parallel_dit_losses_and_ema_equal_ddp(built_data, tmp_path):
    """DiT under TP=2 (attention and MLP split, adaLN replicated), with its EMA: 20 steps equal
    one DDP process on the same global batch (one data-parallel replica draws the same noise),
    and the exported EMA weights match."""
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    steps = ["tasks.diffusion.trainer.max_steps=20", "tasks.diffusion.trainer.log_every=1",
             "tasks.diffusion.trainer.ckpt_every=20", "tasks.diffusion.trainer.prefetch_batches=0",
             "tasks.diffusion.trainer.ema_decay=0.9"]
    ref = run_group(_train_rank, 1, tiny_raw([*steps, "cluster.num_workers=1"]), str(shards["diffusion"]),
                    str(tmp_path / "ddp"), False, "diffusion")[0]
    got = run_group(_train_rank, 2, tiny_raw([*steps, "parallel.tp=2"]), str(shards["diffusion"]),
                    str(tmp_path / "tp"), False, "diffusion")[0]
    assert "tp=2" in got["straight"]["layout"]
    _assert_losses_equal(ref, got, "dit_tp2", evals=0)
    assert got["straight"]["weights"].keys() == ref["straight"]["weights"].keys()
    for k, v in ref["straight"]["weights"].items():
        torch.testing.assert_close(got["straight"]["weights"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_pipeline_parallel_losses_equal_ddp(runs, schedule):
    """2 stages, 2 micro-batches per step (the accumulation micro-batches) against DDP's one
    big batch: the schedule's gradient equals the big batch's. Interleaved 1F1B: 4 stages of a
    4-block model on 2 ranks, each rank running two of them."""
    _assert_losses_equal(runs("ddp_4l" if schedule.startswith("interleaved") else "ddp"), runs(f"pp2_{schedule}"),
                         f"pp2_{schedule}")


@pytest.mark.parametrize("name", ["tp2_compiled", "pp2_1f1b_compiled"])
def test_model_parallel_compiled_losses_equal_ddp(runs, name):
    """trainer.compile=blocks under TP (each block compiled after its split, on DTensors) and
    under PP (each stage's blocks compiled; the last stage's loss is the compiled cross-entropy,
    run inside the schedule's backward): 20 steps equal eager DDP's."""
    _assert_losses_equal(runs("ddp"), runs(name), name)


def test_tensor_parallel_with_activation_checkpointing_by_op_losses_equal_ddp(runs):
    """ac_selective=op on TP=2: the policy keeps (and recomputes) the split blocks' DTensor
    matmuls and attention like the unsplit ones': 20 steps equal DDP without checkpointing."""
    _assert_losses_equal(runs("ddp"), runs("tp2_op_ac"), "tp2_op_ac")


def test_pipeline_parallel_interleaved_exports_ddp_weights(runs):
    """Under interleaving each rank holds two stages: the exported weights (every block,
    gathered from both ranks' two stages, the tied head once) are DDP's keys and values."""
    got, ref = runs("pp2_interleaved_1f1b"), runs("ddp_4l")
    assert "interleaved_1f1b" in got["straight"]["layout"], got["straight"]["layout"]
    assert got["straight"]["weights"].keys() == ref["straight"]["weights"].keys()
    for k, v in ref["straight"]["weights"].items():
        torch.testing.assert_close(got["straight"]["weights"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_pipeline_parallel_with_data_parallel_losses_equal_ddp(runs):
    """PP=2 x DP=2 on 4 ranks: two replicas of a 2-stage pipeline, gradients all-reduced."""
    _assert_losses_equal(runs("ddp"), runs("pp2_dp2"), "pp2_dp2")


def test_tensor_parallel_and_pipeline_parallel_3d_bf16_trains_close_to_ddp_fp32(runs):
    """TP=2 x PP=2 on 4 ranks in bf16 (FSDP2's mixed-precision policy, bf16 activations between
    stages): finite, falling, within 2% of DDP's fp32 losses over 20 steps."""
    ref, got = _losses(runs("ddp")), _losses(runs("tp2_pp2_bf16"))
    assert "tp=2" in runs("tp2_pp2_bf16")["straight"]["layout"] and "pp=2" in runs("tp2_pp2_bf16")["straight"]["layout"]
    assert all(torch.isfinite(torch.tensor(got))) and got[-1] < got[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got, strict=True))
    assert worst < 0.02, f"bf16 tp x pp strays {worst:.2%} from DDP's fp32"
    assert all(v.dtype == torch.float32 for v in runs("tp2_pp2_bf16")["straight"]["weights"].values())


@pytest.mark.parametrize("name", ["tp2", "pp2_1f1b", "pp2_interleaved_1f1b"])
def test_tensor_parallel_and_pipeline_parallel_resume_is_bit_exact(runs, name):
    """Resumed from the step-10 DCP checkpoint, a run ends with the same weights and losses."""
    run = runs(name)
    straight, resumed = run["straight"], run["resumed"]
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]
    for k, v in straight["weights"].items():
        assert torch.equal(v, resumed["weights"][k]), f"{name}: {k} differs after resume"


def test_tensor_parallel_and_pipeline_parallel_export_equals_ddp_layout(runs):
    """The exported safetensors hold exactly DDP's keys (tied head included), and the weights
    equal DDP's own after 20 steps within float tolerance."""
    ref = runs("ddp")["straight"]["weights"]
    for name in ("tp2", "pp2_1f1b", "fsdp_tp2x2"):
        got = runs(name)["straight"]["weights"]
        assert got.keys() == ref.keys(), name
        for k, v in ref.items():
            assert got[k].shape == v.shape and got[k].dtype == v.dtype
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def _load_rank(rank: int, world: int, raw: dict, ckpt: str) -> dict:
    """Build the model under the layout `raw` names, load a checkpoint another layout wrote and
    return the consolidated weights (what export would write)."""
    from pipeline.config import validate
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.precision import Precision
    from pipeline.models.gpt import GPT
    from pipeline.training.optim import build_optimizer

    cfg = validate(raw)
    with torch.device("meta"):
        model = GPT(cfg.task("lm").model, 300, 32)
    torch.manual_seed(cfg.seed + 1)  # a different init: the load must overwrite every weight
    device = torch.device("cpu")
    strategy = build_strategy(cfg.strategy, Precision("fp32", device), device, StepSettings(4, 1, 1.0),
                              cfg.parallel)
    strategy.setup(model, lambda m: build_optimizer(m, cfg.task("lm").optim))
    strategy.load(Path(ckpt), {})
    weights = strategy.consolidated_state_dict()
    return weights if rank == 0 else {}


LOADS = [("tp2", "ddp"), ("pp2_1f1b", "fsdp")]


@pytest.fixture(scope="module")
def loads(runs):
    """Each (written, read) pair's `_load_rank` on rank 0, both in one group of ranks (one spawn)."""
    from pipeline.runtime.local_group import run_group

    calls = [(tiny_raw(STEPS + VARIANTS[read]), str(runs(written)["root"] / "straight" / "checkpoint_00000020"))
             for written, read in LOADS]
    return dict(zip(LOADS, run_group(_each, 2, _load_rank, calls)[0], strict=True))


@pytest.mark.parametrize(("written", "read"), LOADS)
def test_tensor_parallel_and_pipeline_parallel_checkpoint_loads_under_another_layout(runs, loads, written, read):
    """TP=2 -> DDP and PP=2 -> FSDP2: the final checkpoint's DCP state, read under the other
    layout and consolidated, is bit-identical to the weights the writing run exported."""
    run = runs(written)
    got = loads[(written, read)]
    exported = run["straight"]["weights"]
    assert got.keys() == exported.keys()
    for k, v in exported.items():
        assert torch.equal(got[k], v), f"{written} -> {read}: {k} differs"


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.tp=3"], "must divide cluster.num_workers"),
    (["parallel.tp=2", "cluster.num_workers=4", "tasks.lm.model.n_kv_heads=1"], "n_kv_heads (1) must be divisible"),
    (["parallel.pp=2", "tasks.lm.model.n_layers=3"], "n_layers (3) must be divisible by parallel.pp"),
    (["parallel.pp=2"], "grad_accum_steps (1) is the pipeline's micro-batch count"),
    (["parallel.tp=2", "strategy.name=deepspeed"], "strategy.name=deepspeed cannot combine"),
    (["parallel.tp=2", "precision.dtype=fp16"], "precision.dtype=fp16"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "tasks.lm.trainer.grad_accum_steps=2"],
     "n_layers (2) must be divisible by parallel.pp (2) x 2 stages per rank under interleaved_1f1b"),
    (["parallel.pp=2", "tasks.lm.trainer.grad_accum_steps=3"], "global_batch_size (8) must be divisible"),
])
def test_tensor_parallel_and_pipeline_parallel_config_errors_name_the_keys(overrides, message):
    """Layouts that cannot run fail at validation (before any worker), one line naming the keys."""
    import re

    from pydantic import ValidationError

    from pipeline.config import validate
    from pipeline.config.parallel import check_task_parallel

    with pytest.raises((ValidationError, ValueError), match=re.escape(message)):
        check_task_parallel(validate(tiny_raw(overrides)), "lm")


def test_tensor_parallel_and_pipeline_parallel_refusals_name_the_chain(tiny_cfg):
    """A config may hold a chain that cannot use the layout: its train stage says which."""
    from pipeline.config import validate
    from pipeline.config.parallel import check_task_parallel

    cfg = validate(tiny_raw(["parallel.pp=2", "tasks.lm.trainer.grad_accum_steps=2"]))
    check_task_parallel(cfg, "lm")
    with pytest.raises(ValueError, match=r"tasks\.diffusion\.model\.kind=dit cannot use parallel\.pp=2"):
        check_task_parallel(cfg, "diffusion")


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2", "tasks.lm.trainer.global_batch_size=3"],  # dp 1: any batch
    ["parallel.pp=2", "parallel.pp_schedule=gpipe", "tasks.lm.trainer.grad_accum_steps=2",
     "tasks.lm.trainer.global_batch_size=2"],
    ["parallel.tp=2", "cluster.num_workers=4", "tasks.lm.trainer.global_batch_size=6"],  # dp 2
], ids=["tp2", "pp2", "tp2-dp2"])
def test_tensor_parallel_and_pipeline_parallel_batch_splits_over_the_replicas_not_the_workers(overrides):
    """The batch splits over the data-parallel replicas (workers / (tp x pp)): the worker-count
    check of elastic ranges refused these (3 over 2 workers) though the layout trains them."""
    from pipeline.config import validate
    from pipeline.config.elastic import check_task_elastic
    from pipeline.config.parallel import check_task_parallel

    cfg = validate(tiny_raw(overrides))
    check_task_parallel(cfg, "lm")
    check_task_elastic(cfg, "lm")
    # without the layout the same batch over the same workers is refused (3 over 2; 6 over 4; 2 over 2 x 2)
    plain = [o for o in overrides if not o.startswith("parallel.")]
    with pytest.raises(ValueError, match=r"global_batch_size \(\d\) must split evenly"):
        check_task_elastic(validate(tiny_raw(plain)), "lm")


def _dropout_rank(rank: int, world: int, dropout: float) -> dict:
    """One GPT block split over 2 tp ranks whose local heads are the same weights (heads h and
    h + 2 of 4 made equal before the split), run in training mode: the attention output of each
    rank's heads (what `wo` takes), the logits, a draw from the global stream after, and the
    gradients of a step with and without activation checkpointing (whose recompute must draw the
    masks the forward drew)."""
    from torch.distributed.device_mesh import init_device_mesh

    from pipeline.config.schema import GPTConfig
    from pipeline.distributed.activation import apply_activation_checkpointing
    from pipeline.distributed.tensor_parallel import apply_tensor_parallel, tp_plan
    from pipeline.models.gpt import GPT

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(d_model=32, n_layers=1, n_heads=4, dropout=dropout), 50, 16)
        with torch.no_grad():
            for name in ("wq", "wk", "wv"):
                w = getattr(model.blocks[0].attn, name).weight
                w[w.shape[0] // 2 :] = w[: w.shape[0] // 2]
        apply_tensor_parallel(model, tp_plan(model), mesh)
        seen = []
        model.blocks[0].attn.wo.register_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(args[0].to_local() if hasattr(args[0], "to_local") else args[0]))
        if checkpointed:
            apply_activation_checkpointing(model, "full")
        model.train()
        torch.manual_seed(1)  # as the loop seeds it: alike on the tp ranks of a replica
        logits = model(torch.randint(0, 50, (2, 16)))
        after = torch.rand(4)
        logits.square().mean().backward()
        grads = {n.replace("_checkpoint_wrapped_module.", ""):
                 (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
                 for n, p in model.named_parameters()}
        if not checkpointed:
            out = {"heads": seen[0].detach(), "logits": logits.detach(), "after": after, "grads": grads}
        else:
            out["checkpointed_grads"] = grads
    return out


def test_tensor_parallel_attention_dropout_draws_its_own_masks_per_tp_rank():
    """Attention dropout under tp: each tp rank's local heads get masks of their own (Megatron-
    LM's per-tp-rank RNG stream), so heads h and h + n_heads/tp no longer share one; the global
    stream after the attention is the same on both ranks (the residual dropout on the replicated
    activations draws alike), and so are the logits; activation checkpointing's recompute draws
    the forward's masks (the same gradients). Without dropout the same-weight heads give
    the same output: the control that shows the setup would see shared masks."""
    from pipeline.runtime.local_group import run_group

    # (both settings in one group of ranks: one spawn; each call seeds what it draws)
    for dropout, r0, r1 in zip((0.0, 0.5), *run_group(_each, 2, _dropout_rank, [(0.0,), (0.5,)]), strict=True):
        assert torch.equal(r0["after"], r1["after"]) and torch.equal(r0["logits"], r1["logits"])
        for r in (r0, r1):  # the recompute drew the forward's masks: the same gradients
            assert r["checkpointed_grads"].keys() == r["grads"].keys()
            for name, grad in r["grads"].items():
                torch.testing.assert_close(r["checkpointed_grads"][name], grad, rtol=1e-6, atol=1e-7, msg=name)
        same = torch.equal(r0["heads"], r1["heads"])
        assert same if dropout == 0 else not same, dropout
        if dropout:  # about half the attention weights dropped on each rank, not the same half
            differ = (r0["heads"] != r1["heads"]).float().mean().item()
            assert differ > 0.2, differ


@pytest.mark.parametrize(("n", "fits", "nearest"), [(7, False, (6, 8)), (9, False, (8, 10)), (3, True, None),
                                                    (8, True, None)])
def test_interleaved_micro_batch_count_refusal_names_counts_that_fit(n, fits, nearest):
    """torch's interleaved 1F1B runs n // pp rounds of equal size: the refusal names the nearest
    counts that fit (it said "a multiple of 3 (or at most 2)" for 7, then refused 9 as "a multiple of 4")."""
    from pipeline.config import validate
    from pipeline.config.parallel import check_task_parallel

    cfg = validate(tiny_raw(["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "tasks.lm.model.n_layers=4",
                             f"tasks.lm.trainer.grad_accum_steps={n}", f"tasks.lm.trainer.global_batch_size={2 * n}"]))
    if fits:
        check_task_parallel(cfg, "lm")
        return
    with pytest.raises(ValueError) as e:
        check_task_parallel(cfg, "lm")
    assert str(e.value).endswith(f"{n} // parallel.pp (2) = {n // 2} rounds of equal size, which {n} does not split "
                                 f"into: use {nearest[0]} or {nearest[1]}"), str(e.value)


def _world_one_rank(rank: int, world: int) -> dict:
    from benchmarks.gpu_model_parallel import CASES, run_case

    return {name: run_case(name, "fp32", torch.device("cpu"), 2, 64)["losses"] for name in CASES}


def test_tensor_parallel_and_pipeline_parallel_paths_at_world_size_one():
    """The single-GPU check (benchmarks/gpu_model_parallel.py) on CPU: the tp and pp code paths
    over size-1 mesh dimensions train exactly like DDP."""
    from pipeline.runtime.local_group import run_group

    losses = run_group(_world_one_rank, 1)[0]
    for name, got in losses.items():
        assert got == losses["ddp"], name


def _stage_masks(rank: int, world: int, count_stages: bool) -> list[torch.Tensor]:
    """A pp=2 (gpipe) GPT with dropout 0.5, one step of 2 micro-batches: the dropout masks this
    rank's stage drew, its global RNG seeded as the loop seeds it (`dropout_seed`), with the stage
    counted or, as before, not."""
    from pipeline.config.schema import DDPConfig, GPTConfig, OptimConfig, ParallelConfig
    from pipeline.distributed import StepSettings
    from pipeline.distributed.mesh_strategy import MeshStrategy
    from pipeline.distributed.precision import Precision
    from pipeline.models.gpt import GPT
    from pipeline.tasks.lm import LanguageModeling
    from pipeline.training.loop import dropout_seed
    from pipeline.training.optim import build_optimizer

    device = torch.device("cpu")
    strategy = MeshStrategy(DDPConfig(), Precision("fp32", device), device, StepSettings(2, 2, 1.0),
                            ParallelConfig(pp=2, pp_schedule="gpipe"))
    with torch.device("meta"):
        model = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4, dropout=0.5), 64, 16)
    torch.manual_seed(0)
    strategy.setup(model, lambda m: build_optimizer(m, OptimConfig(lr=1e-2, warmup_steps=0)))
    masks: list[torch.Tensor] = []
    for module in strategy.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, args, out: masks.append(out == 0))
    strategy.model.train()
    rows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    micros = [{"x": rows[i::2, :-1], "y": rows[i::2, 1:]} for i in range(2)]
    torch.manual_seed(dropout_seed(0, 0, strategy.dp_rank, strategy.pp_rank if count_stages else 0))
    strategy.forward_backward(micros, LanguageModeling(), None)
    return masks


def test_pipeline_parallel_stages_draw_their_own_dropout_masks():
    """Under pp the loop seeded dropout by step and data-parallel rank only: every stage drew the
    same stream, so stage 1's blocks reused the masks stage 0's had drawn one call earlier (about
    half the activations, dropped alike in two layers). Seeded per stage (as Megatron-LM offsets
    its seed by the pipeline rank), no mask of one stage is another's; the same setup seeded as
    before finds shared masks (the control)."""
    from pipeline.runtime.local_group import run_group

    def shared(stage0: list[torch.Tensor], stage1: list[torch.Tensor]) -> int:
        drawn = [m for m in stage1 if m.any() and not m.all()]  # (a zero output, as shape inference's, drew nothing)
        return sum(a.shape == b.shape and torch.equal(a, b) for a in stage0 for b in drawn)

    # (the control and the fix in one group of ranks: one spawn; each call seeds what it draws)
    (control0, stage0), (control1, stage1) = run_group(_each, 2, _stage_masks, [(False,), (True,)])
    assert shared(control0, control1) > 0, "the control: seeded alike, the stages share masks"
    assert len(stage0) > 0 and len(stage1) > 0 and shared(stage0, stage1) == 0
    assert any(m.any() and not m.all() for m in stage1)  # dropout drew: some dropped, some kept


def test_tensor_parallel_dropout_stream_compiles_once():
    """trainer.compile=blocks compiles the blocks with TP's per-rank RNG hooks inside: traced, the
    seed drawn each step was a guard that failed every step (a recompile per step until dynamo's
    limit, then the blocks ran partly eager). The hooks run outside dynamo: steps after the first
    compile nothing (dynamo only, `backend="eager"`, to keep it fast)."""
    import torch._dynamo

    from pipeline.config.schema import GPTConfig
    from pipeline.distributed.tensor_parallel import fork_rng_per_tp_rank, tp_plan
    from pipeline.distributed.units import repeated_blocks
    from pipeline.models.gpt import GPT

    torch._dynamo.reset()
    model = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4, dropout=0.1), vocab_size=50, max_seq_len=16).train()
    assert fork_rng_per_tp_rank(model, tp_plan(model), tp_rank=1) == 2
    for block in repeated_blocks(model):
        block.compile(backend="eager")
    tokens = torch.randint(0, 50, (2, 16))
    torch.manual_seed(0)
    model(tokens)  # the first step compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(1, 4):
            torch.manual_seed(step)  # as the loop seeds each step
            assert torch.isfinite(model(tokens)).all()
    torch._dynamo.reset()
