"""Checks that a model-parallel layout (`parallel.tp`, `parallel.pp`) fits the workers, the
models and the chosen strategy: run when the config is validated, before any worker starts.

Each failure is one line naming the keys involved, so `dvc exp run -S parallel.tp=3` stops at
once instead of after Ray has placed its workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig

# Backends that partition the model themselves and cannot share the mesh with tp/pp.
_OWN_PARTITIONING = {
    "deepspeed": "DeepSpeed partitions parameters itself (ZeRO) and has no DTensor or pipeline-stage support here",
    "horovod": "Horovod all-reduces whole gradients over every rank and has no notion of a device mesh",
}


# Stages each rank holds: interleaved 1F1B gives rank r the stages r and r + pp (Megatron-LM's
# virtual pipeline; two, torchtitan's default), which shrinks the bubble by that factor.
INTERLEAVED_STAGES_PER_RANK = 2


def _interleaved_fits(n: int, pp: int) -> bool:
    """Whether torch's interleaved 1F1B schedule takes `n` micro-batches on `pp` ranks: it runs
    max(1, n // pp) rounds, which must split them evenly."""
    return n % max(1, n // pp) == 0


def stages_per_rank(schedule: str) -> int:
    return INTERLEAVED_STAGES_PER_RANK if schedule == "interleaved_1f1b" else 1


def data_parallel_size(workers: int, tp: int, pp: int) -> int:
    """Ranks left for data parallelism once tensor and pipeline parallelism took theirs."""
    return workers // (tp * pp)


def check_parallel(cfg: PipelineConfig) -> None:
    """Raise ValueError (one line, naming the keys) when the layout cannot run on these
    workers with this strategy and precision, whatever the task."""
    par = cfg.parallel
    tp, pp = par.tp, par.pp
    if tp * pp == 1:
        return
    workers = cfg.cluster.num_workers
    if workers % (tp * pp):
        raise ValueError(f"parallel.tp x parallel.pp ({tp} x {pp} = {tp * pp}) must divide cluster.num_workers "
                         f"({workers}): the data-parallel degree is num_workers / (tp x pp)")
    if cfg.strategy.name in _OWN_PARTITIONING:
        raise ValueError(f"strategy.name={cfg.strategy.name} cannot combine with parallel.tp={tp}/parallel.pp={pp}: "
                         f"{_OWN_PARTITIONING[cfg.strategy.name]}; use strategy ddp or fsdp")
    if cfg.precision.dtype == "fp16":
        raise ValueError(f"precision.dtype=fp16 with parallel.tp={tp}/parallel.pp={pp}: dynamic loss scaling is not "
                         "wired through tensor or pipeline parallelism; use bf16 (no loss scale needed) or fp32")


def check_task_parallel(cfg: PipelineConfig, name: str) -> None:
    """The layout against one task's model and batch (the train stage asks before taking any
    resource): a config may hold a chain that cannot use the layout (the U-Net; DiT under pp)
    while another chain trains with it."""
    par = cfg.parallel
    tp, pp = par.tp, par.pp
    if tp * pp == 1:
        return
    dp = data_parallel_size(cfg.cluster.num_workers, tp, pp)
    task = cfg.task(name)
    m, tr = task.model, task.trainer
    where = f"tasks.{name}"
    if tr.global_batch_size % (dp * tr.grad_accum_steps):
        raise ValueError(f"{where}.trainer.global_batch_size ({tr.global_batch_size}) must be divisible by the "
                         f"data-parallel degree x grad_accum_steps ({dp} x {tr.grad_accum_steps}; dp = "
                         f"num_workers / (parallel.tp x parallel.pp))")
    if m.kind == "unet" and tp * pp > 1:
        raise ValueError(f"{where}.model.kind=unet cannot use parallel.tp/parallel.pp: the U-Net publishes no "
                         "tensor- or pipeline-parallel plan (a convolutional model this size needs neither)")
    if m.kind == "dit" and pp > 1:
        raise ValueError(f"{where}.model.kind=dit cannot use parallel.pp={pp}: pipeline stages are cut for the "
                         "GPT only (DiT supports parallel.tp)")
    if tp > 1:
        heads = {"n_heads": m.n_heads}
        if m.kind == "gpt":
            heads["n_kv_heads"] = m.n_kv_heads or m.n_heads
        for key, count in heads.items():
            if count % tp:
                raise ValueError(f"{where}.model.{key} ({count}) must be divisible by parallel.tp ({tp}): "
                                 "each tensor-parallel rank computes whole attention heads")
        hidden = m.mlp_width if m.kind == "gpt" else int(m.d_model * m.mlp_ratio)
        if hidden % tp:
            raise ValueError(f"{where}.model.mlp_ratio (or mlp_hidden) gives an MLP width of {hidden}, "
                             f"which parallel.tp ({tp}) does not divide")
    if pp > 1:
        stages = pp * stages_per_rank(par.pp_schedule)
        if m.n_layers % stages:
            per = "" if stages == pp else f" x {stages // pp} stages per rank under {par.pp_schedule}"
            raise ValueError(f"{where}.model.n_layers ({m.n_layers}) must be divisible by parallel.pp ({pp}){per}: "
                             "every pipeline stage holds the same number of blocks")
        n = tr.grad_accum_steps
        if par.pp_schedule == "interleaved_1f1b" and not _interleaved_fits(n, pp):
            lower = next(k for k in range(n - 1, 0, -1) if _interleaved_fits(k, pp))
            upper = next(k for k in range(n + 1, 2 * n + 2) if _interleaved_fits(k, pp))
            raise ValueError(f"{where}.trainer.grad_accum_steps ({n}) is the pipeline's micro-batch count; "
                             f"interleaved_1f1b runs them in {n} // parallel.pp ({pp}) = {n // pp} rounds of equal "
                             f"size, which {n} does not split into: use {lower} or {upper}")
        if tr.grad_accum_steps < pp and par.pp_schedule == "1f1b":
            raise ValueError(f"{where}.trainer.grad_accum_steps ({tr.grad_accum_steps}) is the pipeline's "
                             f"micro-batch count; parallel.pp_schedule=1f1b needs at least parallel.pp ({pp}) "
                             "of them: raise grad_accum_steps, or use pp_schedule=gpipe")


def check_compile(cfg: PipelineConfig) -> None:
    """`trainer.compile` against the strategy (one line naming the keys). Every strategy compiles
    the model before it wraps or shards it, except under ZeRO-3, whose parameters exist only
    while DeepSpeed's module hooks gather them."""
    if cfg.strategy.name != "deepspeed" or cfg.strategy.zero_stage != 3:
        return
    for name, task in cfg.tasks.items():
        if task.trainer.compile != "none":
            raise ValueError(f"tasks.{name}.trainer.compile={task.trainer.compile} cannot combine with "
                             "strategy.zero_stage=3 (deepspeed): ZeRO-3 gathers each parameter in module hooks "
                             "that torch.compile would trace and recompile on every call; use zero_stage 0-2, "
                             "strategy fsdp, or trainer.compile=none")
