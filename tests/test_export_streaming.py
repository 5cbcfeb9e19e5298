"""Export weights are streamed: gathered one tensor at a time and written into a safetensors file
whose header goes first (`pipeline.safetensors_stream`, `Strategy.full_tensors`), so no process
ever holds a sharded model whole, neither rank 0 at the final checkpoint nor the driver that
copies it into the model folder. And a model folder loads with its weights in memory once
(`load_model`: built on the meta device, the file's tensors assigned)."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.safetensors_stream import header, write_streamed


def _specs(state: dict[str, torch.Tensor]) -> dict:
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


def test_streamed_safetensors_file_reads_back_whole(tmp_path):
    """Tensors arriving in any order, of every common dtype, a scalar and an empty one among them,
    read back exactly with safetensors' own loader; the size is the header plus the data."""
    g = torch.Generator().manual_seed(0)
    state = {"w.f32": torch.randn(7, 5, generator=g), "w.bf16": torch.randn(9, generator=g).bfloat16(),
             "w.f16": torch.randn(2, 3, generator=g).half(), "step": torch.tensor(42),
             "mask": torch.rand(6, generator=g) > 0.5, "empty": torch.zeros(0, 4),
             "ids": torch.arange(5, dtype=torch.int32)}
    path = tmp_path / "m.safetensors"
    size = write_streamed(path, _specs(state), reversed(list(state.items())), metadata={"format": "pt"})
    got = load_file(str(path))
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert size == path.stat().st_size == len(header(_specs(state), {"format": "pt"})[0]) + sum(
        v.numel() * v.element_size() for v in state.values())


@pytest.mark.parametrize(("arrive", "message"), [
    (lambda s: [("a", s["a"]), ("b", torch.zeros(3, 3))], "'b' is torch.float32 (3, 3); the header announced"),
    (lambda s: [("a", s["a"])], "1 announced tensor(s) never arrived: b"),
    (lambda s: [("a", s["a"]), ("a", s["a"]), ("b", s["b"])], "'a' arrived twice"),
    (lambda s: [("a", s["a"]), ("c", s["b"])], "'c' was not announced"),
])
def test_streamed_safetensors_names_the_tensor_that_does_not_match_and_leaves_no_file(tmp_path, arrive, message):
    state = {"a": torch.ones(2), "b": torch.ones(4)}
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_streamed(path, _specs(state), arrive(state))
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary


def test_a_failed_write_still_runs_the_gathers_to_the_end(tmp_path):
    """The writing rank's error (here a tensor that does not match its header, as a full disk
    would be) is raised only after the iterator has run to its end: every step of it may be a
    collective the other ranks are waiting in."""
    from pipeline.safetensors_stream import drain_or_write

    state = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(4)}
    ran: list[str] = []

    def gathers():
        for k, v in state.items():
            ran.append(k)
            yield k, (torch.ones(9) if k == "a" else v)

    with pytest.raises(ValueError, match=r"'a' is torch\.float32"):
        drain_or_write(tmp_path / "m.safetensors", _specs(state), gathers())
    assert ran == ["a", "b", "c"] and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------ on real ranks
CASES = {  # strategy overrides, and the test's ranks
    "fsdp": ["strategy.name=fsdp"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    "fsdp_pp2": ["strategy.name=fsdp", "parallel.pp=2", "tasks.lm.trainer.grad_accum_steps=2"],
}
MODEL = ["tasks.lm.model.d_model=256", "tasks.lm.model.n_layers=4", "tasks.lm.model.n_heads=4",
         "tasks.lm.model.tie_weights=false"]
VOCAB = 4096


class _LiveMemory(TorchDispatchMode):
    """Peak bytes of tensor memory allocated under it and alive at once. An operator's output
    that shares memory with one of its inputs (a view, a detach, a functional collective's
    wrapper) allocated nothing; memory is keyed by its data pointer."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_pointer(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))}
        for t in torch.utils._pytree.tree_leaves(out):
            ptr = _pointer(t)
            if ptr and ptr not in inputs and ptr not in self.live:
                st = t.untyped_storage()
                self.live[ptr] = st.nbytes()
                weakref.finalize(st, self.live.pop, ptr, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _pointer(t) -> int:
    """The data pointer of a plain tensor's memory (0 for anything else: a DTensor's wrapper
    owns none)."""
    if not isinstance(t, torch.Tensor) or (type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)):
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return 0


def _stream_rank(rank: int, world: int, name: str, out_dir: str) -> dict:
    """Build the model sharded under `name`, then on rank 0 count the tensor memory allocated
    and alive while the export weights are streamed to a file, and while they are gathered all
    at once."""
    from pipeline.config import validate
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.precision import Precision
    from pipeline.models.gpt import GPT
    from pipeline.training.checkpoint import write_weights
    from pipeline.training.optim import build_optimizer
    from tests.conftest import tiny_raw

    cfg = validate(tiny_raw(CASES[name] + MODEL))
    with torch.device("meta"):
        model = GPT(cfg.task("lm").model, VOCAB, 32)
    torch.manual_seed(3)
    device = torch.device("cpu")
    strategy = build_strategy(cfg.strategy, Precision("fp32", device), device, StepSettings(2, 2, 1.0), cfg.parallel)
    strategy.setup(model, lambda m: build_optimizer(m, cfg.task("lm").optim))

    def peak(run) -> int:
        counter = _LiveMemory()
        with counter:
            run()
        return counter.peak

    path = Path(out_dir) / "model.safetensors"
    streamed = peak(lambda: write_weights(path.parent if rank == 0 else None, strategy))
    whole: dict[str, torch.Tensor] = {}
    at_once = peak(lambda: whole.update(strategy.consolidated_state_dict()))
    return {"streamed": streamed, "at_once": at_once, "whole": whole} if rank == 0 else {}


def _stream_ranks(rank: int, world: int, names: list[str], out_dir: str) -> dict:
    """`_stream_rank` for several cases one after another in one group of ranks (one spawn and one
    set of imports for all of them), each writing into its own folder."""
    return {name: _stream_rank(rank, world, name, str(Path(out_dir) / name)) for name in names}


@pytest.fixture(scope="module")
def streamed(request, tmp_path_factory) -> tuple[Path, dict]:
    """The cases the selected tests of this module ask for, run once in one group: the folder
    holding each case's weights file, and rank 0's results by case."""
    from pipeline.runtime.local_group import run_group

    names = [n for n in CASES if any(item.module is request.module and
                                     getattr(getattr(item, "callspec", None), "params", {}).get("name") == n
                                     for item in request.session.items)]
    out = tmp_path_factory.mktemp("streamed")
    for name in names:
        (out / name).mkdir()
    return out, run_group(_stream_ranks, 2, names, str(out), timeout_s=1200)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_export_weights_stream_one_tensor_at_a_time(streamed, name):
    """FSDP2, ZeRO-3 and FSDP2 x 2 pipeline stages on 2 gloo ranks: the final checkpoint's
    weights file holds exactly the consolidated weights, and while it is written rank 0 never
    has more than about one whole tensor (the largest, the embedding, under 1/5 of the model) of
    new storage alive; gathering them all at once, as export did before, holds the whole model."""
    from pipeline.config import validate
    from pipeline.models.gpt import GPT
    from tests.conftest import tiny_raw

    folder, results = streamed
    got = results[name]
    written = load_file(str(folder / name / "model.safetensors"))
    eager = GPT(validate(tiny_raw(CASES[name] + MODEL)).task("lm").model, VOCAB, 32)
    torch.manual_seed(3)
    eager.init_weights()  # sharded initialisation draws DDP's weights exactly (tests/test_sharded.py)
    assert written.keys() == eager.state_dict().keys() == got["whole"].keys()
    for k, v in eager.state_dict().items():
        assert torch.equal(written[k], v) and torch.equal(got["whole"][k], v), f"{name}: {k}"
    largest = max(v.numel() * 4 for v in written.values())
    total = sum(v.numel() * 4 for v in written.values())
    assert largest < total / 5
    assert got["at_once"] >= total  # the counter sees the gathers ...
    assert got["streamed"] <= 2 * largest + (1 << 20), (name, got["streamed"], largest, total)  # ... one at a time
    print(f"{name}: rank 0 peak while streaming {got['streamed'] / 2**20:.1f} MiB, gathering at once "
          f"{got['at_once'] / 2**20:.1f} MiB; largest tensor {largest / 2**20:.1f}, model {total / 2**20:.1f} MiB")


# ------------------------------------------------------------------------ loading a model folder
MODELS = {
    "gpt_tied": ("lm", ["tasks.lm.model.tie_weights=true"]),
    "gpt_untied": ("lm", ["tasks.lm.model.tie_weights=false"]),
    "dit": ("diffusion", []),
    "unet": ("diffusion", ["model@tasks.diffusion.model=unet_tiny"]),
}


def _spec(task: str, overrides: list[str]) -> dict:
    from pipeline.config import validate
    from tests.test_sharded import _raw

    tcfg = validate(_raw(overrides)).task(task)
    if task == "lm":
        return {"task": "lm", "model": tcfg.model.model_dump(mode="json"), "vocab_size": 300, "max_seq_len": 32}
    return {"task": "diffusion", "model": tcfg.model.model_dump(mode="json"), "image_shape": [1, 8, 8],
            "num_classes": 10}


@pytest.mark.parametrize("name", list(MODELS))
def test_load_model_assigns_the_files_tensors_and_ties_them_again(tmp_path, name):
    """`load_model` builds on the meta device and takes the file's tensors as the parameters: the
    model equals one built eagerly and loaded by copy (weights, RoPE tables, outputs), tied
    weights are one parameter again, and nothing is left on the meta device."""
    from pipeline.tasks import task_for_spec
    from pipeline.training.checkpoint import load_model, write_model

    spec = _spec(*MODELS[name])
    torch.manual_seed(0)
    eager = task_for_spec(spec).build(spec).eval()
    write_model(tmp_path / "m", {k: v.clone() for k, v in eager.state_dict().items()}, spec)
    model, _ = load_model(tmp_path / "m")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for (k, a), (_, b) in zip(eager.state_dict(keep_vars=True).items(), model.state_dict(keep_vars=True).items(),
                              strict=True):
        assert torch.equal(a, b), f"{name}: {k}"
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in eager.named_buffers()]
    for (n, a), (_, b) in zip(eager.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(a, b), f"{name}: buffer {n}"
    if name.startswith("gpt"):
        assert (model.head.weight is model.embed.weight) == (name == "gpt_tied")
        x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
        assert torch.equal(model(x), eager(x))
    else:
        x, t, y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 9]), \
            torch.tensor([1, 4])
        assert torch.equal(model(x, t, y), eager(x, t, y))


_LOAD = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from pipeline.tasks import task_for_spec
from pipeline.training.checkpoint import load_model, read_model
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
folder, way = Path(sys.argv[1]), sys.argv[2]
with torch.device("meta"):  # whatever building imports lazily belongs to the baseline
    task_for_spec(read_model(folder)[1]).build(read_model(folder)[1])
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
if way == "assign":
    model, _ = load_model(folder)
else:  # what load_model did before: a randomly initialised model, then a copy of the file's tensors
    weights, spec = read_model(folder)
    model = task_for_spec(spec).build(spec)
    model.load_state_dict(weights)
    del weights
assert all(p.sum() == p.sum() for p in model.parameters())  # every weight read (safetensors maps the file)
print(status("VmHWM") - before)
"""


def test_load_model_holds_the_weights_once(tmp_path):
    """A 52M-parameter GPT folder (0.2 GB): loading it and reading every weight takes about the
    file's size above the process's resident size (measured in a fresh process, glibc mapping
    large allocations on their own; the parameters are the file's pages, which safetensors maps),
    where building a randomly initialised model and copying the file into it took twice that."""
    import subprocess
    import sys

    from pipeline.config.schema import GPTConfig
    from pipeline.models.gpt import GPT
    from pipeline.training.checkpoint import WEIGHTS, write_model

    cfg = GPTConfig(d_model=512, n_layers=6, n_heads=8, tie_weights=False)
    model = GPT(cfg, 32768, 64)
    spec = {"task": "lm", "model": cfg.model_dump(mode="json"), "vocab_size": 32768, "max_seq_len": 64}
    write_model(tmp_path / "m", model.state_dict(), spec)
    size = (tmp_path / "m" / WEIGHTS).stat().st_size
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peak = {way: int(subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "m"), way], env=env, check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
            for way in ("assign", "copy")}
    print(f"load_model: {peak['assign'] / 1e9:.2f} GB above resident, eager build + copy {peak['copy'] / 1e9:.2f} GB; "
          f"file {size / 1e9:.2f} GB")
    assert peak["assign"] < 1.3 * size
    assert peak["copy"] > 1.8 * size  # (the measurement sees a second copy where there is one)


def _gather_rank(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from pipeline.distributed.base import gather_rows, whole_on_first

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    cases = {
        "even": (torch.randn(6, 3, generator=g), Shard(0)),
        "uneven": (torch.randn(5, 3, generator=g), Shard(0)),
        "fewer rows than ranks": (torch.randn(1, 4, generator=g), Shard(0)),
        "1-d": (torch.randn(7, generator=g), Shard(0)),
        "columns (all-gathered)": (torch.randn(4, 6, generator=g), Shard(1)),
        "replicated": (torch.randn(3, generator=g), Replicate()),
        "zero-width rows": (torch.randn(5, 0, generator=g), Shard(0)),
    }
    out = {}
    for name, (t, placement) in cases.items():
        got = whole_on_first(distribute_tensor(t, mesh, [placement]))
        out[name] = (got is None) if rank else bool(torch.equal(got, t))
    piece = torch.full((rank + 1, 2), float(rank))  # unequal pieces straight through gather_rows
    got = gather_rows(piece, [1, 2], [0, 1])
    out["rows"] = (got is None) if rank else got.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    return out


def test_export_gathers_each_tensor_on_rank_0_only():
    """`whole_on_first` (what `Strategy.full_tensors` gathers with): FSDP2's row shards, even,
    uneven and with a rank holding no rows, arrive whole and exact on rank 0 by point-to-point
    sends into one preallocated tensor, and the other ranks get nothing (an all-gather gave
    every rank the whole tensor, and gloo's a second copy of it); other layouts go through
    DTensor's all-gather, with the same result on rank 0."""
    from pipeline.runtime.local_group import run_group

    for rank, result in enumerate(run_group(_gather_rank, 2)):
        assert all(result.values()), (rank, result)
        assert len(result) == 8
