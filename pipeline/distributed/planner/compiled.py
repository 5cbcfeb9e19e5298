"""What a compiled step holds: inductor's own graphs, replayed on fake tensors, counting only the
buffers inductor would write.

`torch.compile` changes a step's memory in two ways the eager trace cannot see: AOT autograd's
partitioner (with inductor's settings and joint-graph passes) chooses which forward values are
saved for backward and which are recomputed, and inductor's fused kernels never write most
intermediates (the fp32 upcast of the logits inside a compiled cross-entropy, the SwiGLU's
products). So the planner does not estimate either: it compiles the same modules with the same
`compile_fx` entry point inductor uses (`planning_backend`), but with an `inner_compile` that,
instead of generating kernels, replays each partitioned forward and backward graph node by node
on the fake tensors (`_Replay`). The dispatch mode counting live bytes (`trace._LiveBytes`) sees
every node's output; the nodes inductor would fuse away are run uncounted.

Which nodes inductor writes (`written_nodes`) follows its lowering rules:

* the graph's outputs (the saved activations, the module's output, the gradients) and, through
  views, the buffers they are views of;
* the results and inputs of kernels it does not generate: matmuls and convolutions (extern
  calls into cuBLAS, oneDNN, ...), and every operator it has no lowering for or falls back on
  (attention, for one);
* a reduction's result (small);
* a pointwise value read by more than one user when inductor's `should_realize_on_reuse` would
  store it rather than recompute it in each reader: its fused expression reads more than
  `realize_reads_threshold` buffers or has more than `realize_opcount_threshold` operations,
  or, on CPU only, it computes an exponential, logarithm, sigmoid or tanh.

Everything else is a fused intermediate. And a backward's donated inputs (saved activations only
it reads, `bw_donated_idxs`) are freed after their last use, since inductor writes over them; its
other inputs stay referenced by the caller to the end.

Not modelled: the order inductor's scheduler runs fused kernels in (the replay keeps the graph's),
which regions checkpointed whole depend on; the trace keeps the eager trace for those
(`trace.traces_compiled`). Checked against inductor's real CPU allocations (every
allocation the profiler records in one compiled step): `tests/test_planner_compiled.py`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

# inductor's heavy ops: on CPU a reused value computing one is stored (ir.py, should_realize_on_reuse)
_CPU_HEAVY = {"exp", "log", "log10", "log1p", "log2", "sigmoid", "tanh"}


def _opcount_threshold(device: str) -> int:
    """Operations above which inductor stores a reused value (`has_large_inner_fn`)."""
    from torch._inductor import config

    if getattr(config, "realize_opcount_threshold", None) is not None:
        return config.realize_opcount_threshold
    default = getattr(config, "_realize_opcount_threshold_default", 30)
    return getattr(config, "realize_cpu_opcount_threshold", default) if device == "cpu" else default


def _extern_ops() -> set[Any]:
    """Operators inductor calls a library kernel for even though it has a lowering."""
    aten = torch.ops.aten
    return {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten.convolution.default, aten._scaled_mm.default, aten._int_mm.default}


def _is_view(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def _is_kernel(node: fx.Node, extern: set[Any]) -> bool:
    """Whether inductor runs `node` as a kernel it did not generate (its inputs and output are
    buffers in memory)."""
    from torch._inductor import lowering

    if node.op != "call_function":
        return False
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return True  # higher-order operators (the RNG wrappers of checkpointed regions)
    return target in extern or target in lowering.fallbacks or target not in lowering.lowerings


def _is_reduction(node: fx.Node) -> bool:
    """Whether the output has fewer elements than its largest input (a reduction, not pointwise)."""
    out = node.meta.get("val")
    ins = [a.meta.get("val") for a in node.all_input_nodes]
    sizes = [t.numel() for t in ins if isinstance(t, torch.Tensor)]
    return isinstance(out, torch.Tensor) and bool(sizes) and out.numel() < max(sizes)


def written_nodes(gm: fx.GraphModule, device: str) -> set[fx.Node]:
    """The nodes of a partitioned graph whose values inductor writes to memory (module docstring)."""
    from torch._inductor import config

    extern = _extern_ops()
    opcount_threshold = _opcount_threshold(device)
    written: set[fx.Node] = set()

    def write(node: Any) -> None:
        while isinstance(node, fx.Node) and node not in written:
            written.add(node)
            if not (node.op == "call_function" and _is_view(node) and node.args):
                return
            node = node.args[0]  # a view is written where its base is

    reads: dict[fx.Node, set[fx.Node]] = {}  # buffers the fused expression of an unwritten value reads
    ops: dict[fx.Node, tuple[int, set[str]]] = {}  # its operation count and operator names
    for node in gm.graph.nodes:
        if node.op == "output":
            for value in torch.utils._pytree.tree_leaves(node.args[0]):
                write(value)
        if node.op != "call_function":
            continue
        if _is_kernel(node, extern):
            write(node)
            for arg in node.all_input_nodes:
                write(arg)
            continue
        if _is_reduction(node):  # inductor stores a reduction's result (small) for its readers
            write(node)
            continue
        inputs = node.all_input_nodes
        reads[node] = set().union(*[reads.get(a, {a}) if a not in written else {a} for a in inputs])
        count = 1 + sum(ops.get(a, (0, set()))[0] for a in inputs if a not in written)
        names = {str(getattr(node.target, "__name__", node.target)).split(".")[0]}
        names = names.union(*[ops.get(a, (0, set()))[1] for a in inputs if a not in written])
        ops[node] = (count, names)
        if len(node.users) > 1 and not _is_view(node) and (
                len(reads[node]) > config.realize_reads_threshold or count > opcount_threshold
                or (device == "cpu" and names & _CPU_HEAVY)):
            write(node)
    return written


class _Replay(fx.Interpreter):
    """Runs a partitioned graph node by node, the nodes inductor fuses away uncounted. With
    `block_types` (a compiled whole model, whose block hooks cannot run inside the graph), it
    sets the tracker's phase from each node's module stack: 1 in a block's forward, 2 in its
    backward, 0 elsewhere."""

    def __init__(self, gm: fx.GraphModule, written: set[fx.Node], tracker: Any, backward: bool,
                 block_types: set[type]) -> None:
        super().__init__(gm)
        self.written = written
        self.tracker, self.backward, self.block_types = tracker, backward, block_types

    def run_node(self, n: fx.Node) -> Any:
        if self.block_types:
            stack = (n.meta.get("nn_module_stack") or {}).values()
            in_block = any(kind in self.block_types for _, kind in stack)
            self.tracker.phase = (2 if self.backward else 1) if in_block else 0
        if n.op != "call_function" or n in self.written:
            return super().run_node(n)
        with self.tracker.uncounted():
            return super().run_node(n)


def planning_backend(tracker: Callable[[], Any], device: str,
                     block_types: set[type] | None = None) -> Callable[..., Any]:
    """A torch.compile backend that partitions as inductor does and replays the graphs under the
    tracker `tracker()` returns, as a `device` ("cpu" or "cuda") inductor would write them;
    `block_types` as `_Replay` takes it."""
    from torch._inductor.compile_fx import compile_fx

    def inner_compile(gm: fx.GraphModule, example_inputs: Any, is_backward: bool = False,
                      **_: Any) -> Callable[[list[Any]], Any]:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        written = written_nodes(gm, device)  # (once per graph: every block runs the same one)
        donated: set[fx.Node] = set()
        context = torch._guards.TracingContext.try_get()
        if is_backward and context is not None and context.fw_metadata is not None:
            donated = {placeholders[i] for i in getattr(context.fw_metadata, "bw_donated_idxs", None) or []}

        def run(args: list[Any]) -> Any:
            # A donated input (a saved activation only this backward reads) is dropped after its
            # last use, as inductor's generated code drops it; the rest stay referenced by the caller.
            env = dict(zip(placeholders, args, strict=True))
            kept = [v for p, v in env.items() if p not in donated]
            args.clear()
            out = _Replay(gm, written, tracker(), is_backward, block_types or set()).run(initial_env=env)
            del kept
            return out

        run._boxed_call = True  # type: ignore[attr-defined]  # AOT autograd passes the inputs as one list
        return run

    return functools.partial(compile_fx, inner_compile=inner_compile)


@contextlib.contextmanager
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's in-process state reset before and after: the trace compiles the model's code
    objects with its own backend at micro-batches 2 and 3, which a later real compile in the same
    process must neither reuse nor read as a dynamic batch dimension. Plan before compiling for
    real (the train stage and benchmarks do): code compiled earlier in the process recompiles."""
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
