"""Sharded initialisation and sharded EMA, on 2 real gloo ranks.

Sharded init: a model built on the meta device is materialised by FSDP2 or ZeRO-3 one unit at
a time, each rank keeping only its shard, and the weights must be exactly a DDP run's
(`torch.equal` on the consolidated state dict): tied embeddings stay tied, RoPE tables are
recomputed, activation checkpointing does not change anything.

Sharded EMA: each rank averages only its own shard (FSDP2: DTensor shards; ZeRO-3: the fp32
master partitions). After 20 steps the exported EMA equals DDP's within 1e-6, and a run
resumed from the step-10 checkpoint ends with bit-identical EMA weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.distributed import VARIANTS
from tests.conftest import tiny_raw

SHARDED = ["fsdp", "zero3"]


# ----------------------------------------------------------------------------- initialisation
def _raw(overrides: list[str]) -> dict:
    """tiny_raw, with config-group choices (`model@...=...`) composed instead of set."""
    from pipeline.config import compose
    from pipeline.config.loading import apply_overrides
    from tests.conftest import ROOT, TINY, TINY_GROUPS

    groups = [o for o in overrides if "@" in o.split("=")[0]]
    chosen = {g.split("=")[0] for g in groups}
    raw = compose(ROOT / "configs", [g for g in TINY_GROUPS if g.split("=")[0] not in chosen] + groups)
    return apply_overrides(raw, TINY + [o for o in overrides if o not in groups])


def _init_rank(rank: int, world: int, cases: list[tuple[str, list[str]]]) -> dict:
    """For each (model, overrides) case and each strategy: the consolidated weights right after
    setup, one forward on fixed inputs, and whether tied weights are still one parameter."""
    from pipeline.config import validate
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.activation import apply_activation_checkpointing
    from pipeline.distributed.precision import Precision
    from pipeline.models.dit import DiT
    from pipeline.models.gpt import GPT
    from pipeline.models.unet import UNet
    from pipeline.training.optim import build_optimizer

    out: dict = {}
    for kind, overrides in cases:
        for name in ["ddp", *SHARDED]:
            cfg = validate(_raw(VARIANTS[name] + overrides))
            task = "lm" if kind == "gpt" else "diffusion"
            mcfg = cfg.task(task).model
            with torch.device("meta"):
                model = GPT(mcfg, 300, 32) if kind == "gpt" else (DiT if kind == "dit" else UNet)(mcfg, (1, 8, 8), 10)
            apply_activation_checkpointing(model, cfg.task(task).trainer.activation_checkpointing)
            torch.manual_seed(cfg.seed)
            device = torch.device("cpu")
            strategy = build_strategy(cfg.strategy, Precision("fp32", device), device, StepSettings(2, 1, 1.0))
            strategy.setup(model, lambda m, c=cfg, t=task: build_optimizer(m, c.task(t).optim))
            weights = strategy.consolidated_state_dict()
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                if kind == "gpt":
                    y = strategy.model(torch.randint(0, 300, (2, 32), generator=gen))
                else:
                    y = strategy.model(torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([3, 700]),
                                       torch.tensor([1, 10]))
            plain = strategy.unwrapped
            tied = plain.head.weight is plain.embed.weight if kind == "gpt" else None
            out[(kind, " ".join(overrides), name)] = (weights, y.float().clone(), tied)
    return out if rank == 0 else {}


INIT_CASES = [
    ("gpt", ["tasks.lm.model.tie_weights=true"]),
    ("gpt", ["tasks.lm.model.tie_weights=false", "tasks.lm.model.init=xavier",
             "tasks.lm.trainer.activation_checkpointing=full"]),
    ("gpt", ["tasks.lm.model.pos_emb=learned", "tasks.lm.model.init=he", "tasks.lm.model.n_kv_heads=1"]),
    ("dit", ["model@tasks.diffusion.model=dit_tiny", "tasks.diffusion.trainer.activation_checkpointing=full"]),
    ("unet", ["model@tasks.diffusion.model=unet_tiny"]),
]


@pytest.fixture(scope="module")
def init_results():
    from pipeline.runtime.local_group import run_group

    return run_group(_init_rank, 2, INIT_CASES)[0]


@pytest.mark.parametrize("name", SHARDED)
@pytest.mark.parametrize("case", range(len(INIT_CASES)), ids=[f"{k}-{i}" for i, (k, _) in enumerate(INIT_CASES)])
def test_sharded_init_equals_ddp(init_results, name, case):
    """The consolidated weights right after a sharded setup are DDP's, bit for bit, and so is
    one forward pass (which also reads the recomputed RoPE tables and the tied head)."""
    kind, overrides = INIT_CASES[case]
    key = " ".join(overrides)
    ref_w, ref_y, ref_tied = init_results[(kind, key, "ddp")]
    got_w, got_y, got_tied = init_results[(kind, key, name)]
    assert got_w.keys() == ref_w.keys()
    for k, v in ref_w.items():
        assert torch.equal(got_w[k], v), f"{name} {kind}: {k} differs from DDP's initial weight"
    assert torch.equal(got_y, ref_y), f"{name} {kind}: first forward differs from DDP's"
    assert got_tied == ref_tied, f"{name}: tied embeddings came apart"


def test_sharded_init_draws_one_unit_at_a_time():
    """The initialisation driver never has more than one unit whole: the embeddings (with the
    head when tied), then each block on its own, in the unsharded order. Every operation while a
    unit is drawn (its allocation included) runs with the previous units' whole tensors already
    freed: on an H200 the 7B preset's setup peaked one block higher while a unit's list of whole
    tensors outlived it into the next unit's allocation."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.config import validate
    from pipeline.distributed.sharded_init import init_by_unit
    from pipeline.models.gpt import GPT

    cfg = validate(tiny_raw(["tasks.lm.model.tie_weights=false"])).task("lm").model
    with torch.device("meta"):
        model = GPT(cfg, 300, 32)
    units: list[int] = []
    drawn: list[weakref.ref] = []  # the whole tensors of every unit placed so far
    overlaps: list[str] = []

    def place(pairs) -> None:
        drawn.extend(weakref.ref(f) for _, f in pairs)
        units.append(sum(f.numel() for _, f in pairs))

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(r() is not None for r in drawn):
                overlaps.append(f"{func} while drawing unit {len(units)}")
            return func(*args, **(kwargs or {}))

    with Watch():
        init_by_unit(model, torch.device("cpu"), place)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = model.embed.weight.numel() + model.head.weight.numel() + model.norm.weight.numel()
    assert units == [root] + [block] * cfg.n_layers
    assert overlaps == [], overlaps[:3]
    assert all(p.is_meta for p in model.parameters())  # the driver kept nothing whole itself

    eager = GPT(cfg, 300, 32)
    torch.manual_seed(0)
    eager.init_weights()
    with torch.device("meta"):
        lazy = GPT(cfg, 300, 32)
    torch.manual_seed(0)
    kept: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in lazy.named_parameters()}
    init_by_unit(lazy, torch.device("cpu"), lambda pairs: kept.update({names[id(p)]: f.detach().clone()
                                                                       for p, f in pairs}))
    for n, p in eager.named_parameters():  # unit order == the order of an eager init_weights
        assert torch.equal(kept[n], p), n


def _from_file_rank(rank: int, world: int, path: str) -> dict:
    """Each strategy starts from the weights in `path` (activation checkpointing on, tied head)."""
    from pipeline.config import validate
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.activation import apply_activation_checkpointing
    from pipeline.distributed.precision import Precision
    from pipeline.models.gpt import GPT
    from pipeline.training.optim import build_optimizer

    out = {}
    for name in ["ddp", *SHARDED]:
        cfg = validate(tiny_raw(VARIANTS[name] + ["tasks.lm.trainer.activation_checkpointing=full"]))
        with torch.device("meta"):
            model = GPT(cfg.task("lm").model, 300, 32)
        apply_activation_checkpointing(model, "full")
        device = torch.device("cpu")
        strategy = build_strategy(cfg.strategy, Precision("fp32", device), device, StepSettings(2, 1, 1.0))
        strategy.init_from = Path(path)
        strategy.setup(model, lambda m, c=cfg: build_optimizer(m, c.task("lm").optim))
        out[name] = strategy.consolidated_state_dict()
    return out if rank == 0 else {}


def test_sharded_init_from_safetensors(tmp_path):
    """`trainer.init_from`: DDP reads the file whole; FSDP2 and ZeRO-3 read it one unit at a time
    into their shards. All three end with exactly the file's weights."""
    from safetensors.torch import save_file

    from pipeline.config import validate
    from pipeline.models.gpt import GPT
    from pipeline.runtime.local_group import run_group

    torch.manual_seed(5)
    source = GPT(validate(tiny_raw()).task("lm").model, 300, 32)
    weights = {k: v.detach().clone() for k, v in source.state_dict().items()}
    save_file(weights, str(tmp_path / "model.safetensors"))
    got = run_group(_from_file_rank, 2, str(tmp_path / "model.safetensors"))[0]
    for name, state in got.items():
        for k, v in weights.items():
            assert torch.equal(state[k], v), f"{name}: {k} is not the file's"


def test_sharded_init_from_names_a_missing_or_misshapen_tensor(tmp_path):
    from safetensors.torch import save_file

    from pipeline.distributed.sharded_init import copy_from_safetensors

    save_file({"a": torch.zeros(2, 3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"trainer.init_from: .*w.safetensors has no tensor 'b'"):
        copy_from_safetensors(tmp_path / "w.safetensors", {"b": torch.empty(2, 3)})
    with pytest.raises(ValueError, match=r"'a' has shape \(2, 3\), the model needs \(3, 2\)"):
        copy_from_safetensors(tmp_path / "w.safetensors", {"a": torch.empty(3, 2)})


# ----------------------------------------------------------------------------- EMA
ZERO2_BF16 = [*VARIANTS["zero2"], "precision.dtype=bf16"]
EMA_VARIANTS = {"zero2_bf16": ZERO2_BF16}  # beyond pipeline.distributed.VARIANTS
EMA_COMMON = ["tasks.lm.trainer.max_steps=20", "tasks.lm.trainer.ckpt_every=10", "tasks.lm.trainer.log_every=5",
              "tasks.lm.trainer.keep_last_k=5", "tasks.lm.trainer.ema_decay=0.9"]


def _ema_rank(rank: int, world: int, raw: dict, shards: str, root: str, legacy: bool = False) -> dict:
    from safetensors.torch import load_file

    from pipeline.config import validate
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    def run(name: str) -> dict[str, torch.Tensor]:
        session = LocalSession(Path(root) / name, rank=rank, world=world)
        train(validate(raw), "lm", Path(shards), session)
        with session.latest_checkpoint() as ckpt:
            return load_file(str(ckpt / "model.safetensors")) if rank == 0 else {}

    out = {"straight": run("straight")}
    if rank == 0:  # the raw (not averaged) final weights, read offline from the checkpoint
        with LocalSession(Path(root) / "straight").latest_checkpoint() as ckpt:
            if (ckpt / "state.pt").exists():
                out["raw"] = torch.load(ckpt / "state.pt", weights_only=True)["model"]
            elif (ckpt / "deepspeed").exists():
                from pipeline.distributed.deepspeed import consolidate_checkpoint

                out["raw"] = consolidate_checkpoint(ckpt)
    src = Path(root) / "straight" / "checkpoint_00000010"
    if rank == 0:
        shutil.copytree(src, Path(root) / "resumed" / src.name)
    torch.distributed.barrier()
    out["resumed"] = run("resumed")
    if legacy:  # the step-10 checkpoint as the older pipeline wrote it: every rank's EMA whole
        if rank == 0:
            shutil.copytree(src, Path(root) / "legacy" / src.name)
            files = sorted((Path(root) / "legacy" / src.name / "deepspeed").glob("extra_rank_*.pt"))
            extras = [torch.load(f, weights_only=True) for f in files]
            shapes = {k: v.shape for k, v in out["straight"].items()}
            # ZeRO-1/2 partition each flat group in rank order: a parameter's fragments, joined in
            # rank order, are the whole parameter
            whole = {k: torch.cat([e["ema"][k].reshape(-1) for e in extras]).view(shapes[k])
                     for k in extras[0]["ema"] if k in shapes and extras[0]["ema"][k].shape != shapes[k]}
            assert whole, "no EMA entry is a fragment: nothing to convert"
            for f, extra in zip(files, extras, strict=True):
                extra["ema"] = {k: whole.get(k, v) for k, v in extra["ema"].items()}
                torch.save(extra, f)
            from pipeline.training.checkpoint import seal_checkpoint

            for r in range(world):  # (the rewritten files' records, as the older pipeline sealed them)
                seal_checkpoint(Path(root) / "legacy" / src.name, r, world)
        torch.distributed.barrier()
        out["legacy"] = run("legacy")
    return out


def _ema_ranks(rank: int, world: int, jobs: list[tuple[str, dict, str]], shards: str) -> dict:
    """Several strategies' `_ema_rank` one after another in one group of ranks (one spawn and one
    set of imports for all of them, as tests/test_strategies.py runs its strategies)."""
    return {name: _ema_rank(rank, world, raw, shards, root, name == "zero2_bf16") for name, raw, root in jobs}


@pytest.fixture(scope="module")
def ema_runs(request, built_data, tmp_path_factory):
    """Each strategy's EMA run, once per module. The first request trains every strategy the
    selected tests of this module ask for (DDP, the reference, with the equality test) in one group."""
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    wanted = {"ddp"} if any(item.module is request.module and item.originalname == "test_sharded_ema_equals_ddp"
                            for item in request.session.items) else set()
    wanted |= {item.callspec.params["name"] for item in request.session.items
               if item.module is request.module and "ema_runs" in getattr(item, "fixturenames", ())
               and "name" in getattr(getattr(item, "callspec", None), "params", {})}
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            batch = [n for n in ("ddp", *SHARDED, *EMA_VARIANTS) if n == name or (n in wanted and n not in cache)]
            jobs = [(n, tiny_raw(EMA_COMMON + (VARIANTS[n] if n in VARIANTS else EMA_VARIANTS[n])),
                     str(tmp_path_factory.mktemp(f"ema-{n}"))) for n in batch]
            cache.update(run_group(_ema_ranks, 2, jobs, str(shards["lm"]), timeout_s=1800)[0])
        return cache[name]

    return get


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_ema_equals_ddp(ema_runs, name):
    """20 fp32 steps on 2 ranks with ema_decay 0.9: the exported (gathered) EMA equals DDP's
    within 1e-6 absolute.

    FSDP2 meets 1e-6 outright (bit-exact without clipping). ZeRO-3's *training* weights differ
    from DDP's by up to about 1.6e-6 in a few elements (Adam amplifies last-bit gradient
    differences where a gradient is near zero, clipping or not), and no average can be closer to
    DDP's than the weights it averages: there the EMA is held to 1e-6 beyond the raw weights'
    own difference, so the EMA itself adds no error (measured: it adds none).
    """
    ref, got = ema_runs("ddp")["straight"], ema_runs(name)["straight"]
    assert got.keys() == ref.keys()
    ema_diff = {k: (got[k] - v).abs().max().item() for k, v in ref.items()}
    raw_diff = {k: 0.0 for k in ref}
    if name == "zero3":
        raw_ref, raw_got = ema_runs("ddp")["raw"], ema_runs(name)["raw"]
        raw_diff = {k: (raw_got[k] - raw_ref[k]).abs().max().item() for k in ref if k in raw_got}
    for k, d in ema_diff.items():
        assert d <= 1e-6 + raw_diff.get(k, 0.0), (
            f"{name}: EMA {k} differs from DDP's by {d:.2e} (raw weights differ by {raw_diff.get(k, 0.0):.2e})")
    moved = max((got[k] - ema_runs(name)["raw"][k]).abs().max().item() for k in ref) if name == "zero3" else 1.0
    assert moved > 1e-4, "the exported weights are the raw weights, not an average"


@pytest.mark.parametrize("name", ["ddp", *SHARDED, "zero2_bf16"])
def test_sharded_ema_resume_is_bit_exact(ema_runs, name):
    """Each rank's EMA shard is saved with the checkpoint and restored: a run resumed from step
    10 exports exactly the EMA of an uninterrupted one. `zero2_bf16`: ZeRO-2 in bf16, whose EMA
    is each rank's fragment of the fp32 master (`DeepSpeedStrategy.ema_source`)."""
    result = ema_runs(name)
    for k, v in result["straight"].items():
        assert torch.equal(v, result["resumed"][k]), f"{name}: EMA {k} differs after resume"
    if name == "zero2_bf16":  # a checkpoint whose EMA the older pipeline saved whole resumes too, exactly
        for k, v in result["straight"].items():
            assert torch.equal(v, result["legacy"][k]), f"{name}: EMA {k} differs after resuming a whole-EMA checkpoint"


def test_sharded_ema_is_local_to_each_rank():
    """The EMA keeps whatever the strategy hands it: under ZeRO-3 a 1-d partition per rank, so
    its update is a local lerp (no gather) and its size is a shard's."""
    from pipeline.training.ema import EMA

    part = {"w": torch.zeros(5)}
    ema = EMA(part, decay=0.5)
    part["w"] += 1.0
    ema.update(part, step=100)
    assert ema.state_dict()["w"].shape == (5,)
    torch.testing.assert_close(ema.state_dict()["w"], torch.full((5,), 0.5))


# ----------------------------------------------------------------------------- EMA of the fp32 master
def _master_rank(rank: int, world: int, plain: dict, averaged: dict, shards: str, root: str) -> dict:
    """A run without EMA (its export: DeepSpeed's fp32 master weights) and one with an EMA that
    keeps only the last weights (ema_decay 1e-6); rank 0 returns both exports and every rank's
    saved EMA state (`extra_rank_*.pt`)."""
    from safetensors.torch import load_file

    from pipeline.config import validate
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    out: dict = {}
    for name, raw in (("plain", plain), ("ema", averaged)):
        session = LocalSession(Path(root) / name, rank=rank, world=world)
        train(validate(raw), "lm", Path(shards), session)
        with session.latest_checkpoint() as ckpt:
            if rank == 0:
                out[name] = load_file(str(ckpt / "model.safetensors"))
                if name == "ema":
                    out["extra"] = [torch.load(f, weights_only=True)["ema"]
                                    for f in sorted((ckpt / "deepspeed").glob("extra_rank_*.pt"))]
    return out


def test_zero2_bf16_ema_averages_the_fp32_master(built_data, tmp_path):
    """ZeRO-2 in bf16 on 2 ranks: with ema_decay 1e-6 (the EMA is the last weights, to 1e-6 of
    a step) the exported EMA equals the export without EMA, DeepSpeed's fp32 master weights,
    within fp32 rounding. It averaged the bf16 module weights before (their rounding: 9.8e-4
    here, and every update below one bf16 ulp lost). Each rank's EMA holds only its fragment of
    the master (no gather per step): the fragments of a parameter add up to it."""
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    plain = tiny_raw([*ZERO2_BF16, "tasks.lm.trainer.ema_decay=0.0"])
    averaged = tiny_raw([*ZERO2_BF16, "tasks.lm.trainer.ema_decay=0.000001"])
    got = run_group(_master_rank, 2, plain, averaged, str(shards["lm"]), str(tmp_path))[0]
    master, ema = got["plain"], got["ema"]
    assert ema.keys() == master.keys()
    assert any(not torch.equal(v.bfloat16().float(), v) for v in master.values()), "the export is not the fp32 master"
    diff = max((ema[k] - v).abs().max().item() for k, v in master.items())
    assert diff < 1e-6, f"the EMA is {diff:.2e} from the fp32 master weights it should average"

    parts = got["extra"]
    assert len(parts) == 2 and all(p.keys() == master.keys() for p in parts)
    for k, v in master.items():
        sizes = [p[k].numel() for p in parts]
        assert sum(sizes) == v.numel() or sizes == [v.numel()] * 2, f"{k}: EMA pieces of {sizes} elements"
    whole = sum(v.numel() for v in master.values())
    assert all(sum(t.numel() for t in p.values()) < 0.75 * whole for p in parts), "the EMA is not sharded"
