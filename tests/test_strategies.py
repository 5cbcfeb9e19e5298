"""Every parallelism backend trains the same model: 2 real ranks over gloo on CPU.

One group of processes runs every strategy in turn (Horovod in a group of its own), each in
order: 20 fp32 steps with a checkpoint at step 10; a resume from that step-10 checkpoint in a
fresh loop; 6 steps with 2-way gradient accumulation and 6 without (same global batch); and 6
bf16 steps. The tests then compare:
per-step losses against DDP's, resumed weights against the uninterrupted run's, accumulated
against plain, and the exported (consolidated) weights against DDP's.

DDP, FSDP and DeepSpeed run in processes spawned by `run_group` (a plain gloo group, the
process group Ray Train would set up); Horovod runs on Ray through `horovod.ray.RayExecutor`,
the same launcher the pipeline uses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.distributed import VARIANTS
from tests.conftest import tiny_raw

STRATEGIES = VARIANTS
COMMON = ["tasks.lm.trainer.max_steps=20", "tasks.lm.trainer.ckpt_every=10", "tasks.lm.trainer.log_every=1",
          "tasks.lm.trainer.keep_last_k=5", "tasks.diffusion.trainer.ema_decay=0"]
SHORT = ["tasks.lm.trainer.max_steps=6", "tasks.lm.trainer.ckpt_every=6"]


def _scenario(rank: int, world: int, raws: dict, shards: str, root: str, horovod: bool = False) -> dict:
    """Runs inside each rank; returns rank 0's losses and final weights."""
    from safetensors.torch import load_file

    from pipeline.config import validate
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    barrier = None
    if horovod:
        from pipeline.runtime.horovod import _barrier as barrier

    def run(name: str, key: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        session = LocalSession(Path(root) / name, rank=rank, world=world, barrier=barrier)
        state = train(validate(raws[key]), "lm", Path(shards), session)
        with session.latest_checkpoint() as ckpt:
            weights = load_file(str(ckpt / "model.safetensors")) if rank == 0 else {}
        return [h["loss"] for h in state.history], weights

    out = {}
    out["straight"] = run("straight", "fp32")
    if rank == 0 and raws["fp32"]["strategy"].get("zero_stage", 0) >= 1:
        from pipeline.distributed.deepspeed import consolidate_checkpoint

        with LocalSession(Path(root) / "straight").latest_checkpoint() as ckpt:
            out["offline"] = consolidate_checkpoint(ckpt)
    if rank == 0:  # "kill" after step 10: a fresh run folder holding only the step-10 checkpoint
        src = Path(root) / "straight" / "checkpoint_00000010"
        shutil.copytree(src, Path(root) / "resumed" / src.name)
    (barrier or torch.distributed.barrier)()
    out["resumed"] = run("resumed", "fp32")
    out["plain"] = run("plain", "short")
    out["accum"] = run("accum", "accum")
    out["bf16"] = run("bf16", "bf16")
    if "fp16" in raws:
        out["fp16"] = run("fp16", "fp16")
    return out


def _scenarios(rank: int, world: int, jobs: dict[str, tuple[dict, str]], shards: str) -> dict:
    """Several strategies' scenarios one after another in one group of ranks (one spawn and one
    set of imports for all of them, as benchmarks/planner.py runs its layouts)."""
    return {name: _scenario(rank, world, raws, shards, root) for name, (raws, root) in jobs.items()}


def _horovod_scenario(raws: dict, shards: str, root: str) -> dict:
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    out = _scenario(hvd.rank(), hvd.size(), raws, shards, root, horovod=True)
    out["validation_rows"] = hvd.allgather_object(_validation_rows(raws["fp32"]))
    return out


def _validation_rows(raw: dict) -> list[int]:
    """The validation rows this rank's strategy reads of one global batch of 8 (row i holds the
    token i throughout, so a batch names its rows)."""
    import numpy as np

    from pipeline.config import validate
    from pipeline.distributed import build_strategy
    from pipeline.distributed.base import StepSettings
    from pipeline.distributed.precision import Precision
    from pipeline.tasks import task_named
    from pipeline.training.validation import validation_loss

    cfg, device = validate(raw), torch.device("cpu")
    task = task_named("lm")
    model = task.build(task.model_spec(cfg.task("lm"), {"vocab_size": 300, "seq_len": 32}))
    strategy = build_strategy(cfg.strategy, Precision("fp32", device), device, StepSettings(4, 1, 1.0))
    strategy.setup(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    seen: list[int] = []
    to_tensors = task.batch_to_tensors
    task.batch_to_tensors = lambda batch, dev: (seen.extend(batch["tokens"][:, 0].tolist()), to_tensors(batch, dev))[1]
    validation_loss(task, strategy, {"tokens": np.repeat(np.arange(16)[:, None], 33, axis=1)}, 8, 1, device, 0)
    return seen


def _raws(name: str) -> dict:
    """The configs of one strategy's scenario."""
    from pipeline.distributed.deepspeed import cpu_fp16_supported

    extra = STRATEGIES[name]
    raws = {"fp32": tiny_raw(COMMON + extra), "short": tiny_raw(COMMON + SHORT + extra),
            "accum": tiny_raw(COMMON + SHORT + extra + ["tasks.lm.trainer.grad_accum_steps=2"]),
            "bf16": tiny_raw(COMMON + SHORT + extra + ["precision.dtype=bf16"])}
    if not name.startswith("zero") or (cpu_fp16_supported() and name != "zero0"):  # (zero0 fp16: refused)
        raws["fp16"] = tiny_raw(COMMON + SHORT + extra + ["precision.dtype=fp16"])
    return raws


@pytest.fixture(scope="module")
def runs(request, built_data, tmp_path_factory):
    """Each strategy's scenario, run once; tests of one strategy share the result. The first
    request runs every spawned strategy this session's selection of this module needs (DDP, the
    reference, always) in one group; Horovod runs on Ray when asked for."""
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params}
    cache: dict[str, dict] = {}
    ray_started = []

    def get(name: str) -> dict:
        if name in cache:
            return cache[name]
        if name == "horovod":
            import ray

            from pipeline.runtime.horovod import run_horovod

            if not ray.is_initialized():  # workers import this module by name, as pytest did
                here = Path(__file__).parent
                ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                         runtime_env={"env_vars": {"PYTHONPATH": f"{here}:{here.parent}"}})
                ray_started.append(True)
            root = str(tmp_path_factory.mktemp(name))
            cache[name] = run_horovod(_horovod_scenario, [_raws(name), str(shards["lm"]), root], 2, 1, False)[0]
        else:
            batch = [n for n in STRATEGIES if n != "horovod" and n not in cache and n in {*selected, "ddp", name}]
            jobs = {n: (_raws(n), str(tmp_path_factory.mktemp(n))) for n in batch}
            cache.update(run_group(_scenarios, 2, jobs, str(shards["lm"]), timeout_s=1800)[0])
        return cache[name]

    yield get
    if ray_started:
        import ray

        ray.shutdown()


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "ddp"])
def test_losses_equal_ddp(runs, name):
    """fp32, same seed, data and model: per-step losses equal DDP's within 1e-5 relative. (They
    differ only in the order of floating-point sums: all-reduce vs reduce-scatter, flat buffers.)"""
    ref, _ = runs("ddp")["straight"]
    got, weights = runs(name)["straight"]
    assert len(got) == len(ref) == 20
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got, strict=True))
    assert worst < 1e-5, f"{name}: per-step loss differs from DDP's by {worst:.2e} relative"
    ddp_weights = runs("ddp")["straight"][1]
    assert weights.keys() == ddp_weights.keys()  # consolidated export: same names as a plain module
    for k, v in ddp_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: exported {k}")


def test_horovod_ranks_validate_their_own_rows(runs):
    """Horovod never initialises torch.distributed: its strategy's data-parallel rank and size are
    Horovod's, so each of 2 ranks validates its half of a global batch (both read all 8 rows when
    they came from torch.distributed's absent group; the mean loss was the same, the work and
    memory twice)."""
    assert runs("horovod")["validation_rows"] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_equals_uninterrupted(runs, name):
    """10 steps, checkpoint, a fresh loop resumes, 10 more: the final weights equal a straight run's
    bit for bit (every backend restores model, optimizer, data position and RNG exactly)."""
    result = runs(name)
    straight_losses, straight = result["straight"]
    resumed_losses, resumed = result["resumed"]
    assert resumed_losses == straight_losses  # history up to 10 comes from the checkpoint, the rest is recomputed
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), f"{name}: {k} differs after resume"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_gradient_accumulation_equals_bigger_batch(runs, name):
    """2 micro-batches of 2 per rank equal one batch of 4 per rank (same global batch of 8)."""
    plain, plain_w = runs(name)["plain"]
    accum, accum_w = runs(name)["accum"]
    worst = max(abs(a - b) / abs(a) for a, b in zip(plain, accum, strict=True))
    assert worst < 1e-5, f"{name}: accumulated losses differ by {worst:.2e} relative"
    for k, v in plain_w.items():
        torch.testing.assert_close(accum_w[k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_bf16_trains_close_to_fp32(runs, name):
    """bf16 (autocast, FSDP's mixed-precision policy, or DeepSpeed's bf16 with fp32 master
    weights) learns like fp32: finite, falling, within 2% of the fp32 losses over 6 steps."""
    fp32, _ = runs(name)["plain"]
    bf16, weights = runs(name)["bf16"]
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16[-1] < bf16[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16, strict=True))
    assert worst < 0.02, f"{name}: bf16 strays {worst:.2%} from fp32"
    assert all(v.dtype == torch.float32 for v in weights.values())  # exported weights are fp32


@pytest.mark.parametrize("name", [n for n in STRATEGIES if not n.startswith("zero")])
def test_fp16_with_loss_scaling_trains_close_to_fp32(runs, name):
    """fp16 autocast with a dynamic loss scaler (FSDP: the sharded scaler, which agrees on
    skipped steps across ranks). DeepSpeed's fp16 needs AVX512-FP16 on CPU, refused otherwise
    (tests/test_memory_techniques.py)."""
    fp32, _ = runs(name)["plain"]
    fp16, weights = runs(name)["fp16"]
    assert all(torch.isfinite(torch.tensor(fp16))) and fp16[-1] < fp16[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(fp32, fp16, strict=True))
    assert worst < 0.02, f"{name}: fp16 strays {worst:.2%} from fp32"
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n.startswith("zero") and n != "zero0"])
def test_zero_checkpoint_consolidates_offline_to_the_exported_weights(runs, name):
    """DeepSpeed's zero_to_fp32 on the merged final checkpoint gives the weights the run exported."""
    _, exported = runs(name)["straight"]
    offline = runs(name)["offline"]
    for k, v in offline.items():
        assert torch.equal(v, exported[k]), f"{name}: {k}"
    assert set(exported) - set(offline) <= {"head.weight"}  # zero_to_fp32 keeps one name for tied weights


def _nan_at_step_3(rank: int, world: int, raws: dict, shards: str, root: str) -> dict:
    """Each config in turn, 5 steps, the third step's loss made NaN: its history and skip count."""
    from pipeline.config import validate
    from pipeline.tasks.lm import LanguageModeling
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    original, out = LanguageModeling.loss, {}
    for name, raw in raws.items():
        calls = [0]

        def loss(self, model, batch, generator=None, calls=calls):
            value = original(self, model, batch, generator)
            if model.training:
                calls[0] += 1
                if calls[0] == 3:
                    value = value * float("nan")
            return value

        LanguageModeling.loss = loss
        try:
            state = train(validate(raw), "lm", Path(shards), LocalSession(Path(root) / name, rank=rank, world=world))
        finally:
            LanguageModeling.loss = original
        out[name] = {"grad_norm": [h["grad_norm"] for h in state.history], "loss": [h["loss"] for h in state.history],
                     "skipped": state.skipped_steps}
    return out


def test_a_non_finite_step_is_skipped_under_deepspeed_as_under_ddp(built_data, tmp_path):
    """A NaN loss at step 3 skips that step and training goes on, with the same gradient norms as
    DDP's. ZeRO-0 in fp32 (the engine drives a plain torch optimizer, with no overflow check of
    its own) applied the NaN step and poisoned every later one, and logged its norm as 0.0."""
    import math

    from pipeline.runtime.local_group import run_group

    short = ["tasks.lm.trainer.max_steps=5", "tasks.lm.trainer.log_every=1", "tasks.lm.trainer.ckpt_every=5",
             "tasks.lm.trainer.grad_clip=1.0"]
    raws = {name: tiny_raw(short + STRATEGIES[name]) for name in ("ddp", "zero0", "zero2")}
    got = run_group(_nan_at_step_3, 1, raws, str(built_data[1]["lm"]), str(tmp_path), timeout_s=600)[0]
    reference = got["ddp"]
    assert reference["skipped"] == 1 and math.isnan(reference["grad_norm"][2])
    for name in ("zero0", "zero2"):
        run = got[name]
        assert run["skipped"] == 1, (name, run)
        assert math.isnan(run["loss"][2]) and all(math.isfinite(v) for v in run["loss"][3:]), (name, run)
        for step in (0, 1, 3, 4):
            assert run["grad_norm"][step] == pytest.approx(reference["grad_norm"][step], rel=1e-4), (name, step, run)


def _setup_state(rank: int, world: int, name: str) -> dict:
    """The weights and the optimizer's step counts right after `setup` (bf16, one rank)."""
    from pipeline.config import validate
    from pipeline.distributed import build_strategy
    from pipeline.distributed.base import StepSettings
    from pipeline.distributed.precision import Precision
    from pipeline.tasks import task_named
    from pipeline.training.optim import build_optimizer

    cfg = validate(tiny_raw([*VARIANTS[name], "precision.dtype=bf16", "tasks.lm.optim.weight_decay=0.1"]))
    task = task_named("lm")
    with torch.device("meta"):
        model = task.build(task.model_spec(cfg.task("lm"), {"vocab_size": 300, "seq_len": 32}))
    torch.manual_seed(0)
    device = torch.device("cpu")
    strategy = build_strategy(cfg.strategy, Precision("bf16", device), device, StepSettings(8, 1, 1.0))
    strategy.setup(model, lambda m: build_optimizer(m, cfg.task("lm").optim))
    return {"weights": strategy.consolidated_state_dict(), "state": len(strategy.optimizer.state),
            "lrs": sorted({group["lr"] for group in strategy.optimizer.param_groups})}


def _setup_states(rank: int, world: int, names: list[str]) -> dict:
    return {name: _setup_state(rank, world, name) for name in names}


def test_zero0_in_half_precision_starts_where_ddp_starts():
    """DeepSpeed's ZeRO-0 bf16/fp16 optimizer steps the optimizer once on zero gradients while it
    is built: AdamW began training at step count 1 (bias correction off for the run) with every
    weight decayed once (0.9999 of DDP's start). Its setup step has no effect now: the same weights
    as ZeRO-1's setup gives (DDP's start, through bf16), no optimizer state yet, the learning rates
    untouched."""
    from pipeline.runtime.local_group import run_group

    # (both in one process: one spawn; each setup seeds its own weights)
    states = run_group(_setup_states, 1, ["zero1", "zero0"])[0]
    zero1 = states["zero1"]  # DeepSpeed's bf16 start (DDP's, through bf16), no hidden step
    zero0 = states["zero0"]
    assert zero0["state"] == 0 and zero1["state"] == 0 and zero0["lrs"] == zero1["lrs"] == [0.001]
    assert zero0["weights"].keys() == zero1["weights"].keys()
    for key, tensor in zero1["weights"].items():
        assert torch.equal(zero0["weights"][key], tensor), key


def test_zero0_with_fp16_is_refused_at_validation():
    """DeepSpeed's ZeRO-0 fp16 optimizer divides the gradients by a loss scale its engine never
    applied (updates 65536 times too small, clipping never on): refused, naming the ways that work."""
    from pipeline.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"strategy.zero_stage=0 with precision.dtype=fp16: .* use "
                                          r"strategy.name=ddp"):
        validate(tiny_raw([*VARIANTS["zero0"], "precision.dtype=fp16"]))
    assert validate(tiny_raw([*VARIANTS["zero1"], "precision.dtype=fp16"])).strategy.zero_stage == 1
