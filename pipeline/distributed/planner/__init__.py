"""Memory planner: what one rank holds at the peak of a training step, per strategy, from the
config alone (no GPU, no Ray, no process group), and the largest micro-batch that fits.

It sits beside the strategies because it has to know their layouts (what `ddp.py`, `fsdp.py`
and `deepspeed.py` keep on each rank); it imports neither DeepSpeed nor Ray.

Modules: `trace.py` (the fake-tensor activation trace and the model's parameter counts),
`cuda_kernels.py` (CUDA's attention and eager norms, for a trace on CPU tensors),
`layouts.py` (each strategy's per-rank state), `planning.py` (the peak, the largest
micro-batch, suggestions, the train stage's check) and `report.py` (the printed table).

How the numbers are made, and why this way:

* **Parameters** are counted on the model the loop would build (`task_for_data(kind).build(spec)`),
  constructed under `FakeTensorMode`: every tensor has its shape and dtype but no storage, so a
  7B preset costs nothing to build. Repeated blocks (the FSDP units) come from
  `units.repeated_blocks`, as in the strategies.
* **Activations are traced, not estimated.** The fake model runs one forward and backward of
  the task's real loss (`Task.loss`), with the configured activation checkpointing
  (`activation.apply_activation_checkpointing`) and precision (bf16/fp16 autocast, and
  low-precision parameters where the strategy keeps them), while a dispatch mode counts the
  bytes of every tensor storage alive after each operator (weak references tell when one is
  freed). That is the allocation sequence eager PyTorch makes, without making it: saved
  activations, autocast weight copies, logits and cross-entropy buffers, one block's recompute
  under checkpointing, and the backward's gradient temporaries all appear by themselves. The
  trace runs at micro-batch 2 and 3; every operator's live bytes are linear in the micro-batch
  (`fixed + per_item * B`), which makes the largest micro-batch an exact integer computation.
  The trace is on CPU tensors, so it sees the CPU's attention kernel: `scaled_dot_product_attention`
  runs the flash kernel there (q, k, v, output and log-sum-exp saved) except with attention
  dropout, where the CPU falls back to the math path (the T x T matrix is saved). For a CUDA
  target the trace runs attention without dropout, which is what the CUDA flash kernel saves
  (its dropout mask is regenerated from an RNG state, not stored). The norms differ too, by an
  activation per norm: for an eager CUDA step the trace runs them as CUDA does (`cuda_kernels.py`:
  fp32 under autocast, RMSNorm as the fused kernel that saves only its input and rstd); with
  the CPU's composite RMSNorm the H200's 1B row was planned 11% over its measured peak.
* **Static state per strategy** (parameters, gradients, optimizer state, fp32 master copies,
  communication buffers) follows each strategy's layout; see `layouts._layout` for every term and
  which measurement it was checked against (`tests/test_planner.py`, `benchmarks/planner.py`).

* **Compilation** (`trainer.compile`, `trainer.compile_loss`). The trace compiles the same
  modules through inductor's own entry point, partitioner and joint-graph passes, but replays
  each partitioned forward and backward graph on the fake tensors instead of generating kernels,
  counting only the buffers inductor writes (`compiled.py`): what its partitioner saves, what
  its fused kernels cannot avoid, never the fp32 logits of a compiled cross-entropy. On CPU this
  equals inductor's real allocations within 0.5% (`tests/test_planner_compiled.py`). Regions
  checkpointed whole (full, every k-th) are traced eagerly under compile: replayed, they came
  out 5-19% under what inductor allocated, the eager trace above it.

* **Tensor and pipeline parallel.** Under `parallel.tp` the trace runs the model one tp rank
  holds (`tensor_parallel.localize`: the split projections at their local shapes), so its
  parameters and activations are that rank's. Under `parallel.pp` every stage is traced on its
  own (`pipeline_parallel.split_stage`), and a stage holds the forward state of as many
  micro-batches as its schedule keeps in flight (`planning.in_flight`; under interleaved 1F1B a
  rank's two stages, by replaying torch's warm-up, `planning.interleaved_in_flight`); the plan is
  the worst rank's. Data parallelism around them is FSDP2's `fully_shard` or `replicate`.

Peak = the larger of (static + gathered parameters + the worst operator of forward/backward,
with gradients as the strategy holds them at that moment) and (static + gradients + the
optimizer step's temporaries). On a CUDA target a fixed runtime reserve (CUDA context, NCCL and
cuBLAS workspaces, which the caching allocator never sees) is added; allocator fragmentation is
not modelled.
"""

from pipeline.distributed.planner.layouts import Breakdown, step_temporaries, zero3_gathered_peak
from pipeline.distributed.planner.planning import MemoryPlan, check_fits, plan, worst_with_suggestion
from pipeline.distributed.planner.report import format_elastic, format_plan
from pipeline.distributed.planner.trace import ActivationProfile, ModelFacts, activation_profile, spec_for_planning

__all__ = ["ActivationProfile", "Breakdown", "MemoryPlan", "ModelFacts", "activation_profile", "check_fits",
           "format_elastic", "format_plan", "plan", "spec_for_planning", "step_temporaries", "worst_with_suggestion",
           "zero3_gathered_peak"]
