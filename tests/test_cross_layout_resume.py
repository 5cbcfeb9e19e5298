"""Resuming a checkpoint under another parallel layout, proven by equivalence: a run that trains
2 steps under one layout and its last 2 under another ends with the weights and losses of the
uninterrupted run that wrote the checkpoint (2 gloo ranks, the tiny GPT with its tied
embedding and head; float tolerance where the layouts' arithmetic differs).

- tensor parallel -> pipeline parallel: the last stage holds the tied weight only as
  `head.weight`, while the writer keyed its optimizer state by `embed.weight`.
- DDP (`state.pt`, the optimizer keyed by position) -> pipeline parallel and FSDP2: every rank
  reads the whole file and keeps its stage or shard.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.distributed import LAYOUT_VARIANTS, VARIANTS
from tests.conftest import tiny_raw

STEPS = ["tasks.lm.trainer.max_steps=4", "tasks.lm.trainer.ckpt_every=2", "tasks.lm.trainer.log_every=1",
         "tasks.lm.trainer.keep_last_k=5", "tasks.lm.trainer.eval_every=0", "tasks.lm.trainer.prefetch_batches=0",
         "tasks.lm.trainer.grad_accum_steps=2"]  # a pipeline's micro-batches; the same for every layout
LAYOUTS = {"ddp": VARIANTS["ddp"], "fsdp": VARIANTS["fsdp"], "tp2": LAYOUT_VARIANTS["tp2"],
           "pp2": LAYOUT_VARIANTS["pp2"]}
MIDWAY = "checkpoint_00000002"


def _train_rank(rank: int, world: int, raw: dict, shards: str, root: str, seed: str | None) -> dict:
    """Train into `root` (first copying the checkpoint `seed` there, to resume from it); return
    the loss history and rank 0's exported weights."""
    from safetensors.torch import load_file

    from pipeline.config import validate
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    if seed is not None:
        if rank == 0:
            shutil.copytree(seed, Path(root) / Path(seed).name)
        torch.distributed.barrier()
    session = LocalSession(Path(root), rank=rank, world=world)
    try:
        state = train(validate(raw), "lm", Path(shards), session)
    except Exception as e:  # the refusal test reads the message
        return {"error": f"{type(e).__name__}: {e}"}
    with session.latest_checkpoint() as ckpt:
        weights = load_file(str(ckpt / "model.safetensors")) if rank == 0 else {}
    return {"history": state.history, "weights": weights}


def _train_ranks(rank: int, world: int, jobs: list[tuple[dict, str, str | None]], shards: str) -> list[dict]:
    """Several runs' `_train_rank` one after another in one group of ranks (one spawn and one set
    of imports for all of them, as tests/test_strategies.py runs its strategies)."""
    return [_train_rank(rank, world, raw, shards, root, seed) for raw, root, seed in jobs]


# The runs each test asks `train` for: (layout, the layout whose step-2 checkpoint it resumes, or None).
USES = {
    "test_tensor_parallel_checkpoint_resumes_under_pipeline_parallel_with_tied_weights": [("tp2", None),
                                                                                         ("pp2", "tp2")],
    "test_ddp_checkpoint_resumes_under_pipeline_parallel_and_fsdp": [("ddp", None)],  # (and its `read` from ddp)
    "test_ddp_checkpoint_without_parameter_names_is_refused_under_pipeline_parallel_in_one_line": [("ddp", None)],
}


@pytest.fixture(scope="module")
def train(request, built_data, tmp_path_factory):
    """`train(layout, seed=None)`: rank 0's result and the run's folder (each run once per module).
    The first request for an uninterrupted run trains every uninterrupted run the selected tests of
    this module use (`USES`) in one group; the first resume from one of their checkpoints, every
    such resume they use whose checkpoint is there."""
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    wanted: set[tuple[str, str | None]] = set()
    for item in request.session.items:
        if item.module is request.module:
            wanted.update(USES.get(item.originalname, ()))
            if item.originalname == "test_ddp_checkpoint_resumes_under_pipeline_parallel_and_fsdp":
                wanted.add((item.callspec.params["read"], "ddp"))
    cache: dict[tuple[str, str | None], dict] = {}
    written: dict[str, Path] = {}  # layout -> the folder of its uninterrupted run

    def seed_of(writer: str | None) -> str | None:
        return str(written[writer] / MIDWAY) if writer else None

    def run(layout: str, seed: Path | None = None) -> dict:
        key = (layout, str(seed) if seed else None)
        if key not in cache:
            jobs = [key]  # (layout, the checkpoint it resumes from or None)
            from_a_run = any(key[1] == seed_of(w) for w in written)
            if seed is None or from_a_run:  # (not for a checkpoint a test made)
                jobs += sorted({(lay, seed_of(w)) for lay, w in wanted if (w is None) == (seed is None) and
                                (w is None or w in written)} - {key} - cache.keys())
            roots = [tmp_path_factory.mktemp(f"resume-{lay}") for lay, _ in jobs]
            results = run_group(_train_ranks, 2, [(tiny_raw(STEPS + LAYOUTS[lay]), str(root), sd)
                                                  for (lay, sd), root in zip(jobs, roots, strict=True)],
                                str(shards["lm"]), timeout_s=1200)[0]
            for (lay, sd), root, result in zip(jobs, roots, results, strict=True):
                cache[(lay, sd)] = {**result, "root": root}
                if sd is None:
                    written[lay] = root
        return cache[key]

    return run


def _assert_equals_uninterrupted(ref: dict, got: dict, tag: str, atol: float) -> None:
    """Same losses at every step (those before the resume come from the checkpoint) and the
    same final weights, within float tolerance across layouts."""
    assert "error" not in got, f"{tag}: {got.get('error')}"
    a, b = [h["loss"] for h in ref["history"]], [h["loss"] for h in got["history"]]
    assert len(a) == len(b) == 4
    for step, (x, y) in enumerate(zip(a, b, strict=True), 1):
        assert abs(x - y) <= 1e-5 * abs(x), f"{tag}: step {step} loss {y!r} vs uninterrupted {x!r}"
    assert got["weights"].keys() == ref["weights"].keys()
    for k, v in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], v, rtol=1e-4, atol=atol, msg=f"{tag}: {k}")


def test_tensor_parallel_checkpoint_resumes_under_pipeline_parallel_with_tied_weights(train):
    """TP=2 saved the tied weight's optimizer state as `embed.weight`; PP=2's last stage,
    holding no embedding, reads it for `head.weight`, and the run ends as the TP=2 run that
    wrote the checkpoint and went on does."""
    written = train("tp2")
    got = train("pp2", written["root"] / MIDWAY)
    _assert_equals_uninterrupted(written, got, "tp2 -> pp2", atol=1e-5)


@pytest.mark.parametrize("read", ["pp2", "fsdp"])
def test_ddp_checkpoint_resumes_under_pipeline_parallel_and_fsdp(train, read):
    """DDP's `state.pt` (whole tensors, optimizer state by position) resumes under PP=2 (each
    stage keeps its blocks; the last its tied head) and FSDP2 (each rank its shards), ending
    with the uninterrupted DDP run's weights."""
    ref = train("ddp")
    got = train(read, ref["root"] / MIDWAY)
    _assert_equals_uninterrupted(ref, got, f"ddp -> {read}", atol=1e-6)


def test_ddp_checkpoint_without_parameter_names_is_refused_under_pipeline_parallel_in_one_line(train, tmp_path):
    """A `state.pt` written before it named its parameters cannot say which optimizer position
    a pipeline stage's parameter is: the resume stops with one line naming what resumes it."""
    from pipeline.atomic import checksum_record, describe_file, read_checksum_record

    seed = tmp_path / MIDWAY
    shutil.copytree(train("ddp")["root"] / MIDWAY, seed)
    state = torch.load(seed / "state.pt", weights_only=True)
    del state["param_names"]
    torch.save(state, seed / "state.pt")
    record = read_checksum_record(seed / "files-rank0.json")  # state.pt changed: record it anew
    record["state.pt"] = describe_file(seed / "state.pt")
    (seed / "files-rank0.json").write_text(checksum_record(record, rank=0))
    got = train("pp2", seed)
    assert got.get("error", "").startswith("CannotReshard: "), got.get("error")
    assert "parallel.pp=1" in got["error"] and "\n" not in got["error"]


def _loss_scales(rank: int, world: int, root: str) -> dict[str, float]:
    """fp16: a strategy whose loss scale overflow halved to 1024 saves a checkpoint, and a fresh
    strategy of each layout loads it; the scale each one goes on with."""
    from torch import nn

    from pipeline.config.schema import DDPConfig, FSDPConfig
    from pipeline.distributed import build_strategy
    from pipeline.distributed.base import StepSettings
    from pipeline.distributed.precision import Precision

    def strategy(cfg):
        s = build_strategy(cfg, Precision("fp16", torch.device("cpu")), torch.device("cpu"), StepSettings(2, 1, 1.0))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        model.init_weights = lambda: None  # (the sharded initialisation's hook: these weights are drawn already)
        s.setup(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
        return s

    out = {}
    for writer, wcfg in (("ddp", DDPConfig()), ("fsdp", FSDPConfig())):
        s = strategy(wcfg)
        with s.precision.autocast():  # one step, so there is optimizer state to resume
            loss = s.model(torch.randn(2, 8)).float().pow(2).mean()
        s.backward(loss)
        s.clip_and_step(1.0)
        s.precision.scaler.update(1024.0)  # as if overflows had halved it six times
        folder = Path(root) / writer
        s.save(folder, {})
        torch.distributed.barrier()
        for reader, rcfg in (("ddp", DDPConfig()), ("fsdp", FSDPConfig())):
            t = strategy(rcfg)
            t.load(folder, {})
            t.precision.scaler.scale(torch.ones(()))  # (65536 here unless the load restored it)
            out[f"{writer}->{reader}"] = float(t.precision.scaler.get_scale())
    return out


def test_fp16_loss_scale_goes_on_after_resume_in_and_across_layouts(tmp_path):
    """FSDP2 saved no loss scale (DDP kept it in state.pt, which no other layout read): a resumed
    fp16 run started again at 65536 and skipped steps on overflow until the scale came back down.
    Every layout now writes scaler.json beside its state and reads it, whichever layout wrote it."""
    from pipeline.runtime.local_group import run_group

    for scales in run_group(_loss_scales, 2, str(tmp_path)):
        assert scales == {"ddp->ddp": 1024.0, "ddp->fsdp": 1024.0, "fsdp->ddp": 1024.0, "fsdp->fsdp": 1024.0}
