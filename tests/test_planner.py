"""The memory planner (`pipeline plan`, `cluster.device_memory`): its parts checked against real
tensors, and its per-rank totals against peaks measured on 2 real gloo ranks.

`pytest -k planner` selects every test here. The last one trains 50 configs (DDP, FSDP2,
ZeRO-1/2/3, tensor and pipeline layouts x activation checkpointing none/full x two GPT sizes, 3.7M
and 13.9M parameters; a 5.1M DiT under DDP, FSDP2 and ZeRO-3) for 2-3 steps each in one group of
two processes, with the harness of benchmarks/planner.py (which records the same check at 13.9M
and 58.2M, and a 16.7M DiT, in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import validate
from tests.conftest import ROOT, tiny_raw

SMALL = ["tasks.lm.model.d_model=256", "tasks.lm.model.n_layers=2", "tasks.lm.model.n_heads=4",
         "tasks.lm.data.seq_len=128", "tasks.lm.data.vocab_size=1024"]


@pytest.mark.parametrize(("mode", "selective"), [("none", "every_k"), ("full", "every_k"), ("selective", "op")])
def test_planner_trace_equals_real_tensors(mode, selective):
    """The fake-tensor trace of a step peaks at, and ends with, exactly the bytes the same step
    holds in real CPU tensors (same counter, real storage; the trace has more operators: the
    views its block hooks add, which allocate nothing)."""
    from pipeline.config.schema import GPTConfig, TrainerConfig
    from pipeline.distributed.activation import apply_activation_checkpointing
    from pipeline.distributed.planner.trace import _LiveBytes, _run_fake
    from pipeline.models.gpt import GPT

    cfg = GPTConfig(d_model=256, n_layers=3, n_heads=4)
    spec = {"task": "lm", "model": cfg.model_dump(), "vocab_size": 1024, "max_seq_len": 128}
    trainer = TrainerConfig(activation_checkpointing=mode, ac_selective=selective)
    _, trace = _run_fake("text", spec, trainer, torch.float32, None, "cpu", 4)
    model = GPT(cfg, 1024, 128)
    apply_activation_checkpointing(model, mode, selective)
    x = torch.zeros(4, 128, dtype=torch.long)
    real = _LiveBytes({t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]})
    with real:
        F.cross_entropy(model(x).float().flatten(0, 1), x.flatten()).backward()
    assert max(trace.live) == max(real.samples)
    assert trace.live[-1] == real.samples[-1]
    grads = sum(p.grad.numel() * 4 for p in model.parameters())
    assert trace.root_grads[-1] + trace.block_grads[-1] == grads


def test_planner_activations_are_linear_in_the_micro_batch():
    """Micro-batch 2 and 3 give every operator's fixed and per-item bytes; traces at 1 and 5 agree."""
    from pipeline.distributed.planner.trace import _run_fake, activation_profile, spec_for_planning

    cfg = validate(tiny_raw([*SMALL, "tasks.lm.trainer.activation_checkpointing=full"]))
    tcfg = cfg.task("lm")
    spec = spec_for_planning(tcfg)
    profile = activation_profile(tcfg, spec, torch.float32, torch.bfloat16, "cpu")
    for mb in (1, 5):
        _, trace = _run_fake("text", spec, tcfg.trainer, torch.float32, torch.bfloat16, "cpu", mb)
        assert list(profile.fixed + mb * profile.per_item) == list(trace.live)


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_planner_plans_both_diffusion_models_and_traces_them_as_real_tensors(kind):
    """Both diffusion models: `pipeline plan diffusion` prints a plan (the DiT's stopped with "not
    linear in the batch": at micro-batch 1 autograd skips the batch sum of the position table's
    gradient, so the trace now runs at 2 and 3), the profile is linear at 5 too, and the trace
    peaks at the bytes the same step holds in real CPU tensors."""
    from pipeline.distributed.planner.report import format_count
    from pipeline.distributed.planner.trace import _LiveBytes, _run_fake, activation_profile, spec_for_planning
    from pipeline.tasks import task_for_data

    raw = tiny_raw()
    if kind == "unet":
        raw["tasks"]["diffusion"]["model"] = {"kind": "unet", "preset": "custom",  # (UNetConfig's defaults)
                                              "diffusion": raw["tasks"]["diffusion"]["model"]["diffusion"]}
    cfg = validate(raw)
    tcfg = cfg.task("diffusion")
    spec = spec_for_planning(tcfg)
    profile = activation_profile(tcfg, spec, torch.float32, None, "cpu")
    _, five = _run_fake("images", spec, tcfg.trainer, torch.float32, None, "cpu", 5)
    assert list(profile.fixed + 5 * profile.per_item) == list(five.live)

    task = task_for_data("images")
    torch.manual_seed(0)
    model = task.build(spec).train()
    assert type(model).__name__ == {"dit": "DiT", "unet": "UNet"}[kind]
    batch = {"x": torch.zeros(5, *spec["image_shape"]), "y": torch.zeros(5, dtype=torch.long)}
    real = _LiveBytes({t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]})
    with real:
        task.loss(model, batch, None).backward()
    # Not to the byte as for the GPT: op by op, the fake trace frees a 1.3 KB tensor near the
    # timestep embedding one operator earlier than the real step does (DiT: within 0.3%), and in
    # the U-Net's backward one (5, 32, 8, 8) activation gradient a few operators later (+1.3%,
    # over: the safe side).
    ratio = max(five.live) / max(real.samples)
    assert 0.997 < ratio < {"dit": 1.005, "unet": 1.02}[kind], (max(five.live), max(real.samples))

    compose = ["--compose", "diffusion", "model@tasks.diffusion.model=unet_tiny"] if kind == "unet" else ["diffusion"]
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", *compose, "--workers", "2",
                          "--device-memory", "8GiB"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "largest micro-batch that fits" in out.stdout
    # the repository's models (params.yaml's DiT; the composed unet_tiny preset, 38.5K parameters)
    assert out.stdout.startswith({"dit": "memory plan: diffusion, 1.3M parameters",
                                  "unet": "memory plan: diffusion, 38.5K parameters"}[kind]), out.stdout
    assert [format_count(n) for n in (999, 38_512, 1_300_000, 1_316_000_000)] == ["999", "38.5K", "1.3M", "1.32B"]


@pytest.mark.parametrize(("task", "strategy", "sharded"), [
    ("diffusion", ["strategy.name=ddp"], False), ("diffusion", ["strategy.name=fsdp"], True),
    ("diffusion", ["strategy.name=deepspeed", "strategy.zero_stage=2"], False),
    ("diffusion", ["strategy.name=deepspeed", "strategy.zero_stage=3"], True),
    ("diffusion", ["strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload_optimizer=true"], True),
    ("diffusion", ["strategy.name=deepspeed", "strategy.zero_stage=2", "precision.dtype=bf16"], True),
    ("diffusion", ["strategy.name=deepspeed", "strategy.zero_stage=1", "precision.dtype=bf16",
                   "strategy.offload_optimizer=true"], True),
    ("lm", ["strategy.name=ddp", "tasks.lm.model.tie_weights=true"], False)])
def test_planner_counts_the_ema_copy_where_the_loop_keeps_it(task, strategy, sharded):
    """trainer.ema_decay > 0 (the diffusion task's default): the loop keeps an fp32 copy of its
    rank's weights (`EMA(strategy.ema_source())`), one clone per state-dict entry (a tied
    embedding twice), whole or as sharded as the strategy's, on the device even when ZeRO-3
    offloads its optimizer (DeepSpeed hands the partitions over as device copies, made again at
    each update: a second copy at the step). The planner left it out, and every DiT row of the
    measured-peaks test below was 10-15% under. Under bf16/fp16 ZeRO-1/2 the EMA averages this
    rank's fp32 master partition (in host memory when the optimizer is offloaded)."""
    from pipeline.distributed.planner import format_plan, plan
    from pipeline.distributed.planner.planning import _evaluator
    from pipeline.distributed.planner.trace import spec_for_planning
    from pipeline.tasks import task_for_data

    def config(decay: float):
        return validate(tiny_raw([*strategy, f"tasks.{task}.trainer.ema_decay={decay}"]))

    def planned(decay: float):
        return plan(config(decay), task, workers=2, target="cuda", micro_batch=4, suggest=False)

    off, on = planned(0.0), planned(0.995)
    tcfg = config(0.995).task(task)
    with torch.device("meta"):
        model = task_for_data(tcfg.data.kind).build(spec_for_planning(tcfg))
    entries = sum(t.numel() for t in model.state_dict().values())
    assert (entries > on.num_params) == (task == "lm")  # the tied embedding, under two names
    copy = 4 * (-(-entries // 2) if sharded else entries)
    offload = "strategy.offload_optimizer=true" in strategy
    on_host = offload and "strategy.zero_stage=3" not in strategy
    assert off.device.ema == off.host.ema == 0 and on.host.ema == (copy if on_host else 0)
    assert on.device.ema == (0 if on_host else copy) and on.device.total - off.device.total == on.device.ema
    step = _evaluator(config(0.995), task, 2, "cuda", None)[0].layout.step
    assert step.ema == (copy if offload and not on_host else 0)
    assert "EMA weights" in format_plan(on) and "EMA weights" not in format_plan(off)


def test_planner_counts_zero3s_fp32_master_on_the_gpu_when_parameters_are_offloaded():
    """ZeRO-3 in fp32 keeps one tensor for the parameter partition and the fp32 master where both
    live on the optimizer's device (`fp32_master_shares_partition`). With `offload_params` the
    partition is in host memory and DeepSpeed clones it onto the GPU for an optimizer stepping
    there (stage3.py `_create_fp32_partitions`): 4 bytes a parameter over N on the device, which
    the planner left out. On a CPU target both are host memory (one tensor), as before."""
    from pipeline.distributed.planner import plan

    zero3 = ["strategy.name=deepspeed", "strategy.zero_stage=3"]

    def planned(target: str, *extra: str):
        return plan(validate(tiny_raw([*zero3, *extra])), "lm", workers=2, target=target, micro_batch=4,
                    suggest=False)

    for target in ("cuda", "cpu"):
        resident, offloaded = planned(target), planned(target, "strategy.offload_params=true")
        master = 4 * -(-resident.num_params // 2) if target == "cuda" else 0
        assert offloaded.device.optimizer - resident.device.optimizer == master, target
        assert offloaded.host.params > 0 and offloaded.device.params < resident.device.params, target
    bf16 = [planned("cuda", "precision.dtype=bf16", *x) for x in ([], ["strategy.offload_params=true"])]
    assert bf16[0].device.optimizer == bf16[1].device.optimizer  # (a bf16 partition has its fp32 master anyway)


@pytest.mark.parametrize(("name", "impl"), [("adamw", "auto"), ("adamw", "fused"), ("adam", "auto"),
                                            ("sgd", "auto"), ("rmsprop", "auto")])
def test_planner_optimizer_temporaries_match_torch(name, impl):
    """`step_temporaries`: a real CPU optimizer step's temporaries, in copies of its largest tensor."""
    from pipeline.config.schema import GPTConfig, OptimConfig
    from pipeline.distributed.planner import step_temporaries
    from pipeline.distributed.planner.trace import _LiveBytes
    from pipeline.models.gpt import GPT
    from pipeline.training.optim import build_optimizer

    model = GPT(GPTConfig(d_model=256, n_layers=2, n_heads=4), 1024, 64)
    optim = OptimConfig(name=name, impl=impl, weight_decay=0.1)
    opt = build_optimizer(model, optim)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # state exists from here on
    held = [*model.parameters(), *(p.grad for p in model.parameters()),
            *(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
    tracker = _LiveBytes({t.untyped_storage()._cdata for t in held})
    with tracker:
        opt.step()
    largest = max(p.numel() for p in model.parameters()) * 4
    predicted = step_temporaries(optim, "cpu") * largest
    assert predicted <= max(tracker.samples, default=0) <= predicted + 0.25 * largest


def test_planner_tensor_parallel_traces_one_tp_rank():
    """Under parallel.tp the trace runs the model one tp rank holds (`tensor_parallel.localize`:
    q/k/v and the MLP's input projections with 1/tp of their outputs, the output projections 1/tp
    of their inputs): block parameters and per-item activations shrink, the replicated embeddings
    and head do not; the micro-batch divides by the data-parallel ranks only."""
    from pipeline.config.schema import GPTConfig
    from pipeline.distributed.planner import format_plan, plan
    from pipeline.distributed.tensor_parallel import localize
    from pipeline.models.gpt import GPT

    model = GPT(GPTConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2), 100, 16)
    assert localize(model, GPT.tp_plan, 2) == 14
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert (attn.wq.out_features, attn.wk.out_features, attn.wo.in_features, attn.wo.out_features) == (32, 16, 32, 64)
    assert (mlp.w1.out_features, mlp.w3.out_features, mlp.w2.in_features) == (mlp.hidden // 2,) * 3
    model(torch.zeros(2, 16, dtype=torch.long)).sum().backward()  # the forward runs on the local heads

    raw = [*SMALL, "tasks.lm.trainer.global_batch_size=8"]
    dp = plan(validate(tiny_raw(raw)), "lm", workers=2)
    tp = plan(validate(tiny_raw([*raw, "parallel.tp=2"])), "lm", workers=2)
    assert tp.strategy == "replicate (FSDP2) x tp=2" and tp.micro_batch == 2 * dp.micro_batch == 8
    whole = GPT(validate(tiny_raw(raw)).task("lm").model, 1024, 128)
    n_whole = sum(p.numel() for p in whole.parameters())
    localize(whole, GPT.tp_plan, 2)
    assert dp.num_params == n_whole and tp.num_params == sum(p.numel() for p in whole.parameters()) < n_whole
    assert "parameters per tp rank (of 2)" in format_plan(tp)
    with pytest.raises(ValueError, match=r"parallel.tp=2 x parallel.pp=1 does not divide 3 workers"):
        plan(validate(tiny_raw([*raw, "parallel.tp=2"])), "lm", workers=3)


def test_planner_pipeline_parallel_holds_what_the_schedule_keeps_in_flight():
    """Under parallel.pp each stage's rank is traced on its own stage (the first takes token ids,
    the others a received hidden state; the last computes the loss), holding as many micro-batches'
    forward state as its schedule keeps in flight: GPipe all of them, 1F1B's stage s `pp - s`. The
    plan is the worst rank's; the largest micro-batch the one every rank fits."""
    from pipeline.distributed.planner import plan
    from pipeline.distributed.planner.planning import in_flight

    assert [in_flight("gpipe", s, 2, 4) for s in (0, 1)] == [4, 4]
    assert [in_flight("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight("1f1b", 0, 4, 2) == 2
    raw = [*SMALL, "tasks.lm.model.n_layers=4", "tasks.lm.trainer.global_batch_size=16",
           "tasks.lm.trainer.grad_accum_steps=4", "parallel.pp=2"]
    gpipe = plan(validate(tiny_raw([*raw, "parallel.pp_schedule=gpipe"])), "lm", workers=2, device_memory="1GiB")
    one_f = plan(validate(tiny_raw([*raw, "parallel.pp_schedule=1f1b"])), "lm", workers=2, device_memory="1GiB")
    assert gpipe.micro_batch == one_f.micro_batch == 4  # the pipeline's micro-batch: global / dp / accumulation
    assert gpipe.device.activations > one_f.device.activations  # 4 micro-batches in flight, not 2
    assert gpipe.largest_micro_batch < one_f.largest_micro_batch
    assert "x pp=2 (gpipe)" in gpipe.strategy and "pipeline stage" in gpipe.split
    whole = plan(validate(tiny_raw([*raw[:-1]])), "lm", workers=2)
    assert max(gpipe.num_params, one_f.num_params) < whole.num_params  # a stage holds part of the model


def test_planner_counts_each_pipeline_stages_receive_buffers():
    """torch's PipelineStage keeps, per micro-batch of the step, a buffer for the hidden state it
    receives (all but the first stage) and one for its output's gradient (all but the last),
    for the whole run: the trace leaves them out, the plan adds micro-batches x their bytes."""
    from pipeline.distributed.planner.layouts import _trace_dtype
    from pipeline.distributed.planner.planning import _autocast_dtype, _evaluator
    from pipeline.distributed.planner.trace import activation_profile, spec_for_planning

    raw = [*SMALL, "tasks.lm.model.n_layers=4", "tasks.lm.trainer.global_batch_size=16", "parallel.pp=2",
           "parallel.pp_schedule=gpipe", "tasks.lm.trainer.grad_accum_steps=4"]
    cfg = validate(tiny_raw(raw))
    tcfg = cfg.task("lm")
    spec = spec_for_planning(tcfg)
    dtypes = (_trace_dtype(cfg), _autocast_dtype(cfg.precision.dtype))  # (the stages' parameters: bf16)
    hidden = spec["max_seq_len"] * 256 * dtypes[0].itemsize  # bytes per item: sequence x d_model
    profiles = [activation_profile(tcfg, spec, *dtypes, "cpu", 1, (i, 4)) for i in range(4)]
    assert [p.recv_per_item for p in profiles] == [hidden, 2 * hidden, 2 * hidden, hidden]
    ranks, _ = _evaluator(cfg, "lm", 2, "cpu", None)
    for rank, evaluator in enumerate(ranks.ranks):  # gpipe holds all 4 forwards, and 4 of each buffer
        stage = activation_profile(tcfg, spec, *dtypes, "cpu", 1, (rank, 2))
        extra = evaluator.profile.per_item - stage.in_flight(4).per_item
        assert set(extra.tolist()) == {4 * hidden}


def test_planner_interleaved_pipeline_replays_torchs_warmup():
    """Interleaved 1F1B: a rank runs two stages (r and r + pp); when its first backward runs it
    holds the forwards torch's ScheduleInterleaved1F1B has run by then, per local stage. The rank
    plans both stages' parameters."""
    from pipeline.distributed.planner import plan
    from pipeline.distributed.planner.planning import interleaved_in_flight

    # pp=2, 2 micro-batches: rank 0 warms up with every forward (4), rank 1 with 2, then one more
    assert interleaved_in_flight(0, 2, 2, 2) == [2, 2] and interleaved_in_flight(1, 2, 2, 2) == [2, 1]
    # pp=4, 8 micro-batches (2 rounds of 4): rank 0 runs 4 + 2 x 3 warm-up forwards, then one more
    assert interleaved_in_flight(0, 2, 4, 8) == [7, 4] and interleaved_in_flight(3, 2, 4, 8) == [4, 1]
    raw = [*SMALL, "tasks.lm.model.n_layers=4", "tasks.lm.trainer.global_batch_size=8",
           "tasks.lm.trainer.grad_accum_steps=2", "parallel.pp=2"]
    inter = plan(validate(tiny_raw([*raw, "parallel.pp_schedule=interleaved_1f1b"])), "lm", workers=2)
    one_f = plan(validate(tiny_raw([*raw, "parallel.pp_schedule=1f1b"])), "lm", workers=2)
    assert "x pp=2 (interleaved_1f1b)" in inter.strategy
    assert inter.device.activations > one_f.device.activations  # rank 0 holds all 4 stage forwards


def test_planner_cuda_norms_allocate_what_cudas_kernels_do():
    """For a CUDA target the trace's norms stand in for CUDA's: RMSNorm saves its input and the
    per-row rstd (the fused kernel), not the CPU composite's fp32 normalised copy as well; under
    autocast the norms run in fp32 (CUDA's autocast list), as they do not on CPU. F is left as
    it was found."""
    from pipeline.distributed.planner.cuda_kernels import cuda_kernels, has_fused_rms_norm

    def saved_bytes(fn, x):
        seen = {}

        def pack(t):  # every storage autograd keeps for backward, once
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x)
        return sum(seen.values()), out

    norm = torch.nn.RMSNorm(64, eps=1e-6)
    x = torch.randn(4, 16, 64, requires_grad=True)
    cpu, _ = saved_bytes(norm, x)
    before = (F.rms_norm, F.layer_norm, F.group_norm)
    with cuda_kernels(eager=True):
        cuda, out = saved_bytes(norm, x)
        out.sum().backward()
        assert x.grad.shape == x.shape and norm.weight.grad.shape == norm.weight.shape
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = torch.randn(2, 8, 64).bfloat16()
            assert F.layer_norm(low, (64,)).dtype == torch.float32
            assert torch.nn.GroupNorm(4, 8)(low.view(2, 8, 8, 8)).dtype == torch.float32
            assert norm(low).dtype == torch.float32
    assert (F.rms_norm, F.layer_norm, F.group_norm) == before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(torch.randn(2, 64).bfloat16(), (64,)).dtype == torch.bfloat16  # the CPU's own rule
    weight = norm.weight.numel() * 4
    if has_fused_rms_norm():
        assert cuda == x.numel() * 4 + weight + 4 * 16 * 4  # input, weight, rstd per row
    assert cpu >= cuda + x.numel() * 4  # the composite keeps at least one more fp32 activation


@pytest.mark.parametrize("emulate", [True, False])
def test_planner_traces_fp8_emulation_on_a_cuda_target_when_training_runs_it(monkeypatch, emulate):
    """With precision.fp8_emulate a GPU run multiplies in torchao's emulation (no `_scaled_mm`),
    so a CUDA target's plan traces that too; it traced float8 GEMMs whatever the flag said.
    Without the flag a CUDA target keeps the float8 GEMMs."""
    pytest.importorskip("torchao.float8")
    from pipeline.distributed import precision
    from pipeline.distributed.planner import plan, trace

    converted: list[torch.nn.Module] = []
    convert = precision.convert_to_fp8

    def recording(model: torch.nn.Module, emulate: bool = False, all_gather: bool = False) -> int:
        converted.append(model)
        return convert(model, emulate=emulate, all_gather=all_gather)

    monkeypatch.setattr(precision, "convert_to_fp8", recording)
    monkeypatch.setattr(trace, "_PROFILE_CACHE", {})
    fp8 = ["precision.dtype=fp8"] + (["precision.fp8_emulate=true"] if emulate else [])
    cfg = validate(tiny_raw([*fp8, "tasks.lm.model.mlp_hidden=1536"]))  # w1, w3: out_features > 1024
    assert plan(cfg, "lm", workers=1, target="cuda", suggest=False).total > 0
    layers = [m for model in converted for m in model.modules() if type(m).__name__ == "Float8Linear"]
    assert layers and {m.config.emulate for m in layers} == {emulate}


def test_planner_matches_the_h200s_eager_and_compiled_1b_peaks():
    """The 1B preset, micro-batch 18, sequence 2048, DDP at world size 1: the planner's CUDA peak
    (less its runtime reserve) against `max_memory_allocated` measured on an H200 (2026-12-04,
    benchmarks/RESULTS.md "On a GPU"): bf16 122.1 GiB eager, 99.6 GiB with compiled blocks and
    the eager loss; fp8 119.8 and 78.0 GiB. Traced with the CPU's composite RMSNorm, the eager
    bf16 plan was 135.7 GiB (11% over); with fp8 planned as bf16, the compiled fp8 plan was the
    bf16 one, 99.6 GiB (28% over: inductor saves the float8 casts of the layers' inputs for
    backward, one byte each, where bf16 keeps two)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu import config
    from pipeline.distributed.planner import plan

    for precision, compile_mode, measured in (("bf16", "none", 122.1), ("bf16", "blocks:eager-loss", 99.6),
                                              ("fp8", "none", 119.8), ("fp8", "blocks:eager-loss", 78.0)):
        p = plan(config("gpt_1b", 2048, precision, "none", compile_mode, 18), "lm", workers=1, target="cuda",
                 micro_batch=18, suggest=False)
        planned = (p.total - p.device.reserve) / 2**30
        assert abs(planned / measured - 1) < 0.01, \
            f"{precision}, {compile_mode}: planned {planned:.2f} GiB, measured {measured}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_planner_predicts_measured_peaks_within_15_percent(tmp_path):
    """Every layout (DDP, FSDP2, ZeRO-1/2/3, tensor, pipeline and 2-D) for the GPT of 13.9M
    parameters, and one of each kind (DDP, FSDP2, ZeRO-3, tensor, pipeline) with full activation
    checkpointing; DDP and FSDP2 for the GPT of 3.7M, where fixed costs weigh most; the diffusion
    task's DiT (5.1M, its EMA on) under DDP, FSDP2 and ZeRO-3; 2 ranks: the planner's per-rank
    peak within 15% of the measured one. (The full matrix of both sizes took 5 min of CI, the same
    layouts several times over: `python benchmarks/planner.py --sizes tiny,small` measures it.)"""
    sys.path.insert(0, str(ROOT))
    from benchmarks.planner import build_shards, compare, configs, print_validation

    jobs = configs(sizes=("small",), ac_modes=("none",)) + \
        configs(sizes=("small",), strategies=("ddp", "fsdp", "zero3", "tp2", "pp2_1f1b"), ac_modes=("full",)) + \
        configs(sizes=("tiny",), strategies=("ddp", "fsdp")) + \
        configs(sizes=("dit_tiny",), strategies=("ddp", "fsdp", "zero3"), ac_modes=("none",))
    rows = compare(jobs, build_shards(tmp_path, ("lm", "diffusion")))
    print_validation(rows)
    bad = [f"{r['name']}: predicted {r['predicted'] / 2**20:.1f} MiB, measured {r['measured'] / 2**20:.1f} MiB "
           f"({r['error']:+.1%})" for r in rows if abs(r["error"]) > 0.15]
    assert not bad, "; ".join(bad)
