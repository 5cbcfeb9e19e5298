"""Output: the plan as a small table a person reads (`python -m pipeline plan`).

It is apart from the plan so that the numbers and their presentation change independently;
it only reads a `MemoryPlan`.
"""

from __future__ import annotations

from pipeline.config.sizes import format_size
from pipeline.distributed.planner.planning import MemoryPlan


def format_count(n: int) -> str:
    """A parameter count as people write it: 48.3K, 124.4M, 1.32B (not 0.0M for a small model)."""
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if n >= scale:
            return f"{n / scale:,.{digits}f}{suffix}"
    return str(n)


def format_plan(p: MemoryPlan) -> str:
    """A small table a person reads: one row per kind of memory, device and host columns."""
    mb = p.micro_batch if p.micro_batch is not None else 1
    lines = [f"memory plan: {p.task}, {format_count(p.num_params)} parameters{p.split}, {p.strategy}, "
             f"{p.workers} workers, {p.precision}, activation checkpointing {p.activation_checkpointing}, "
             f"{p.target} target",
             f"per rank at micro-batch {mb} ({p.item_shape}); peak during the {p.phase}"]
    rows = [("parameters", "params"), ("gradients", "grads"), ("optimizer state", "optimizer"),
            ("activations", "activations"), ("communication buffers", "comm")]
    if p.device.ema or p.host.ema:
        rows.insert(3, ("EMA weights", "ema"))
    if p.device.reserve:
        rows.append(("CUDA runtime reserve", "reserve"))
    offloaded = p.host.total > 0
    width = max(len(r[0]) for r in rows) + 2
    head = f"  {'':<{width}}{'device':>12}" + (f"{'host':>12}" if offloaded else "")
    lines.append(head)
    for label, attr in rows:
        line = f"  {label:<{width}}{format_size(getattr(p.device, attr)):>12}"
        if offloaded:
            line += f"{format_size(getattr(p.host, attr)):>12}"
        lines.append(line)
    lines.append(f"  {'total':<{width}}{format_size(p.total):>12}" +
                 (f"{format_size(p.host.total):>12}" if offloaded else ""))
    if p.device_memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        largest = (f"largest micro-batch that fits: {p.largest_micro_batch}" if p.largest_micro_batch
                   else "not even micro-batch 1 fits")
        lines.append(f"device memory {format_size(p.device_memory)}: micro-batch {mb} {verdict}; {largest}")
        if p.suggestion and not p.suggestion.startswith("fits"):
            lines.append(p.suggestion)
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def format_elastic(plans: list[MemoryPlan], configured: int) -> str:
    """An elastic run's other worker counts, one line each: the global batch is kept, so at fewer
    workers each rank's micro-batch (and a sharded strategy's shard) grows. `configured` is
    `cluster.num_workers`, the count the full plan above describes."""
    lines = [f"elastic (cluster.min_workers..cluster.num_workers = {plans[0].workers}..{configured}), per rank:"]
    for p in plans:
        verdict = "" if p.fits is None else ("  fits" if p.fits else "  does NOT fit")
        lines.append(f"  {p.workers:>3} worker{'s' if p.workers > 1 else ' '}  micro-batch {p.micro_batch:<5} "
                     f"{format_size(p.total):>12}{verdict}")
    return "\n".join(lines)
