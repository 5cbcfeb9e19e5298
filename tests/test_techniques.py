"""Training techniques chosen by config: optimizers, schedules, plateau and early stopping,
label smoothing, initialisation schemes, v-prediction."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import validate
from pipeline.config.schema import DiffusionProcessConfig, GPTConfig, OptimConfig
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.models.gpt import GPT
from pipeline.training.best_weights import BEST
from pipeline.training.checkpoint import load_training_state
from pipeline.training.loop import train
from pipeline.training.optim import ValidationTracker, build_optimizer, lr_at
from pipeline.training.session import LocalSession
from tests.conftest import tiny_raw


@pytest.mark.parametrize(("name", "cls"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                           ("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop)])
def test_optimizers_skip_decay_on_biases_and_norms(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.1, nesterov=name == "sgd"))
    assert isinstance(opt, cls)
    decayed, plain = opt.param_groups
    assert [p.dim() for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    model(torch.randn(2, 4)).sum().backward()
    opt.step()


def test_nesterov_needs_sgd_with_momentum():
    with pytest.raises(ValueError, match="nesterov"):
        OptimConfig(name="adamw", nesterov=True)


def test_schedules():
    base = {"lr": 1.0, "warmup_steps": 10}
    step = OptimConfig(**base, schedule="step", step_size=5, gamma=0.5)
    assert lr_at(4, step, 100) == pytest.approx(0.5) and lr_at(10, step, 100) == 1.0
    assert lr_at(15, step, 100) == 0.5 and lr_at(20, step, 100) == 0.25
    expo = OptimConfig(**base, schedule="exponential", gamma=0.9)
    assert lr_at(12, expo, 100) == pytest.approx(0.81)
    one = OptimConfig(**base, schedule="onecycle", min_lr_ratio=0.01)
    assert lr_at(0, one, 100) == pytest.approx(1 / 25) and lr_at(10, one, 100) == pytest.approx(1.0)
    assert lr_at(100, one, 100) == pytest.approx(0.01)
    const = OptimConfig(**base, schedule="constant")
    assert lr_at(10, const, 100) == lr_at(99, const, 100) == 1.0
    plateau = OptimConfig(**base, schedule="plateau")
    assert lr_at(50, plateau, 100, plateau_scale=0.25) == 0.25


def test_plateau_and_early_stop_tracking():
    cfg = OptimConfig(schedule="plateau", plateau_factor=0.5, plateau_patience=2)
    t = ValidationTracker()
    seen = [t.observe(v, cfg, early_stop_patience=3) for v in (1.0, 0.9, 0.95, 0.95, 0.85, 0.9, 0.9, 0.9)]
    assert seen == [False] * 7 + [True]  # a tie is not an improvement
    assert t.best == 0.85 and t.plateau_scale == 0.25  # halved after each two validations without improvement


def test_plateau_without_validation_is_a_config_error():
    from pipeline.config import ConfigError
    from pipeline.config.loading import apply_overrides

    with pytest.raises(ConfigError, match=r"plateau' needs trainer\.eval_every"):
        validate(apply_overrides(tiny_raw(), ["tasks.lm.optim.schedule=plateau", "tasks.lm.trainer.eval_every=0"]))


def test_early_stopping_stops_and_stays_stopped(built_data, tmp_path):
    _, shards = built_data
    # A learning rate too small to move float32 weights: validation never improves after the first.
    raw = tiny_raw(["tasks.lm.optim.name=sgd", "tasks.lm.optim.momentum=0", "tasks.lm.optim.lr=1e-12",
                    "tasks.lm.optim.schedule=constant", "tasks.lm.trainer.max_steps=20",
                    "tasks.lm.trainer.eval_every=2", "tasks.lm.trainer.early_stop_patience=1",
                    "tasks.lm.trainer.ckpt_every=100", "tasks.lm.trainer.eval_batches=1"])
    cfg = validate(raw)
    state = train(cfg, "lm", shards["lm"], LocalSession(tmp_path))
    assert state.stopped_early and state.step == 4
    assert [h["step"] for h in state.history if "val_loss" in h] == [2, 4]
    _, meta = load_training_state(sorted(tmp_path.glob("checkpoint_*"))[-1])
    assert meta["final"] and meta["stopped_early"]
    again = train(cfg, "lm", shards["lm"], LocalSession(tmp_path))  # a rerun does not train on
    assert again.step == 4


# A learning rate that first helps, then overshoots: validation improves, then worsens.
BEST_RUN = ["tasks.lm.optim.name=sgd", "tasks.lm.optim.momentum=0", "tasks.lm.optim.lr=0.8",
            "tasks.lm.optim.schedule=constant", "tasks.lm.optim.warmup_steps=0", "tasks.lm.trainer.grad_clip=0",
            "tasks.lm.trainer.max_steps=12", "tasks.lm.trainer.eval_every=2", "tasks.lm.trainer.eval_batches=1",
            "tasks.lm.trainer.ckpt_every=2", "tasks.lm.trainer.export_weights=best"]


def _checkpoints(root):
    return {int(p.name.split("_")[1]): p for p in root.glob("checkpoint_*") if p.name[11:].isdigit()}


def test_export_weights_best_hands_on_the_best_validations_weights(built_data, tmp_path):
    from safetensors.torch import load_file

    from pipeline.training.checkpoint import WEIGHTS

    _, shards = built_data
    cfg = validate(tiny_raw(BEST_RUN))
    state = train(cfg, "lm", shards["lm"], LocalSession(tmp_path))
    vals = {h["step"]: h["val_loss"] for h in state.history if "val_loss" in h}
    best_step = min(vals, key=vals.get)
    assert best_step not in (2, 12), vals  # the run improves, then worsens: the test means something
    ckpts = _checkpoints(tmp_path)
    model_at_best, meta_at_best = load_training_state(ckpts[best_step])
    exported = load_file(ckpts[12] / WEIGHTS)
    assert set(exported) == set(model_at_best["model"])
    for name, tensor in exported.items():  # the best step's weights, not the last step's
        assert torch.equal(tensor, model_at_best["model"][name].float()), name
    last, meta = load_training_state(ckpts[12])
    assert any(not torch.equal(exported[k], last["model"][k].float()) for k in exported)
    assert meta["weights_step"] == best_step and meta["best_weights_step"] == best_step
    assert meta["tracker"]["best"] == vals[best_step] and meta_at_best["best_weights_step"] == best_step
    before, written = (ckpts[12] / WEIGHTS).read_bytes(), (ckpts[12] / "meta.json").stat().st_mtime_ns
    assert train(cfg, "lm", shards["lm"], LocalSession(tmp_path)).step == 12  # a rerun of the finished run ...
    assert (_checkpoints(tmp_path)[12] / "meta.json").stat().st_mtime_ns > written  # (written again)
    assert (_checkpoints(tmp_path)[12] / WEIGHTS).read_bytes() == before  # ... hands on the same weights
    assert load_training_state(_checkpoints(tmp_path)[12])[1]["weights_step"] == best_step


def test_export_weights_best_survives_a_resume(built_data, tmp_path):
    """Stopped after the best validation (its weights no longer the model's), the resumed run
    still hands them on: every checkpoint carries them."""
    from pipeline.training.checkpoint import WEIGHTS

    _, shards = built_data
    cfg = validate(tiny_raw(BEST_RUN))
    whole = tmp_path / "whole"
    train(cfg, "lm", shards["lm"], LocalSession(whole))
    meta = load_training_state(_checkpoints(whole)[12])[1]
    best_step = meta["weights_step"]
    cut = tmp_path / "cut"
    for step, path in _checkpoints(whole).items():  # as if the run had died right after step best + 2
        if step <= best_step + 2:
            shutil.copytree(path, cut / path.name)
    assert (_checkpoints(cut)[best_step + 2] / BEST).is_file()
    resumed = train(cfg, "lm", shards["lm"], LocalSession(cut))
    assert resumed.step == 12
    assert (_checkpoints(cut)[12] / WEIGHTS).read_bytes() == (_checkpoints(whole)[12] / WEIGHTS).read_bytes()
    again = load_training_state(_checkpoints(cut)[12])[1]
    losses = [[(h["step"], h["loss"], h.get("val_loss")) for h in m["history"]] for m in (again, meta)]
    assert again["weights_step"] == best_step and losses[0] == losses[1]


def _best_rank(rank: int, world: int, raw: dict, shards: str, root: str, seed: str | None) -> dict:
    """Train into `root` (resuming from a copy of the checkpoint `seed`); rank 0 returns the run's
    handed-on weights and the step they are from."""
    from safetensors.torch import load_file

    from pipeline.training.checkpoint import WEIGHTS, read_meta

    if seed is not None and rank == 0:
        shutil.copytree(seed, Path(root) / Path(seed).name)
    if world > 1:
        torch.distributed.barrier()
    session = LocalSession(Path(root), rank=rank, world=world)
    train(validate(raw), "lm", Path(shards), session)
    with session.latest_checkpoint() as ckpt:
        return {"weights": load_file(str(ckpt / WEIGHTS)), "meta": read_meta(ckpt)} if rank == 0 else {}


def test_export_weights_best_on_sharded_ranks(built_data, tmp_path):
    """FSDP2 on 2 gloo ranks, where every rank joins the gathers of the kept weights: the run
    hands on exactly what a run stopped at its best step hands on, and so does the run resumed
    on 1 rank from a checkpoint taken after its best (the kept file crosses the resize)."""
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    fsdp = ["strategy.name=fsdp"]
    whole = run_group(_best_rank, 2, tiny_raw(BEST_RUN + fsdp), str(shards["lm"]), str(tmp_path / "whole"), None)[0]
    best_step = whole["meta"]["weights_step"]
    assert best_step not in (2, 12), whole["meta"]["tracker"]
    short = run_group(_best_rank, 2, tiny_raw(BEST_RUN + fsdp + [f"tasks.lm.trainer.max_steps={best_step}",
                                                                "tasks.lm.trainer.export_weights=last"]),
                      str(shards["lm"]), str(tmp_path / "short"), None)[0]
    after = _checkpoints(tmp_path / "whole")[best_step + 2]
    resized = run_group(_best_rank, 1, tiny_raw(BEST_RUN + fsdp), str(shards["lm"]), str(tmp_path / "resized"),
                        str(after))[0]
    assert short["meta"]["weights_step"] == best_step == resized["meta"]["weights_step"]
    workers = {h["step"]: h["workers"] for h in resized["meta"]["history"]}
    assert workers[best_step + 2] == 2 and workers[12] == 1  # it did resume the 2-rank run, on 1
    for name, tensor in whole["weights"].items():
        assert torch.equal(tensor, short["weights"][name]) and torch.equal(tensor, resized["weights"][name]), name


def test_export_weights_best_needs_a_validation_before_the_end():
    from pipeline.config import ConfigError
    from pipeline.config.loading import apply_overrides

    for extra in (["tasks.lm.trainer.eval_every=0"],
                  ["tasks.lm.trainer.eval_every=50", "tasks.lm.trainer.max_steps=20"]):
        with pytest.raises(ConfigError, match="export_weights=best needs a validation before the end"):
            validate(apply_overrides(tiny_raw(), ["tasks.lm.trainer.export_weights=best", *extra]))


def test_label_smoothing_applies_to_training_only(built_data):
    from pipeline.data.shard_format import load_manifest
    from pipeline.data.shard_store import read_split
    from pipeline.tasks import task_named

    cfg, shards = built_data
    task = task_named("lm")
    spec = task.model_spec(cfg.task("lm"), load_manifest(shards["lm"]))
    model = task.build(spec)
    batch = task.batch_to_tensors({k: v[:4] for k, v in read_split(shards["lm"], "val").items()}, torch.device("cpu"))
    plain = task.loss(model.train(), batch).item()
    task.label_smoothing = 0.1
    assert task.loss(model.train(), batch).item() != pytest.approx(plain)
    assert task.loss(model.eval(), batch).item() == pytest.approx(plain)


@pytest.mark.parametrize("scheme", ["xavier", "he"])
def test_init_schemes_change_linear_weights(scheme):
    torch.manual_seed(0)
    normal = GPT(GPTConfig(d_model=64, n_layers=2, n_heads=2), 100, 16)
    torch.manual_seed(0)
    other = GPT(GPTConfig(d_model=64, n_layers=2, n_heads=2, init=scheme), 100, 16)
    mlp = other.blocks[0].mlp
    w = torch.cat([mlp.w3.weight, mlp.w1.weight])  # drawn as the one fused input projection
    fan_in, fan_out = w.shape[1], w.shape[0]
    expected = math.sqrt(2 / (fan_in + fan_out)) if scheme == "xavier" else math.sqrt(2 / fan_in)
    assert w.std().item() == pytest.approx(expected, rel=0.1)
    assert normal.blocks[0].mlp.w1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert other.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_v_prediction_recovers_x0_and_eps():
    p = GaussianDiffusion(DiffusionProcessConfig(prediction="v", timesteps=100))
    x0, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 10, 50, 99])
    xt = p.q_sample(x0, t, eps)
    got_eps, got_x0 = p._eps_x0(p.target(x0, t, eps), xt, p._ab(t, xt))
    assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4)


def test_a_loop_resumed_with_another_length_says_the_schedule_bends(built_data, tmp_path, capsys):
    """The pipeline names a run by its max_steps, so only a loop resumed by hand (a test, a
    benchmark, a notebook) can meet a checkpoint of another length: its cosine schedule then
    decays over the new length from the resumed step, and one line says so, with the jump."""
    _, shards = built_data
    steps = ["tasks.lm.trainer.ckpt_every=4", "tasks.lm.optim.schedule=cosine", "tasks.lm.optim.warmup_steps=0"]
    train(validate(tiny_raw([*steps, "tasks.lm.trainer.max_steps=4"])), "lm", shards["lm"], LocalSession(tmp_path))
    capsys.readouterr()
    longer = validate(tiny_raw([*steps, "tasks.lm.trainer.max_steps=8"]))
    assert train(longer, "lm", shards["lm"], LocalSession(tmp_path)).step == 8
    optim = longer.task("lm").optim
    want = (f"[lm] note: the checkpoint was written by a run of 4 steps, this one has 8: the cosine schedule decays "
            f"over 8 steps from here (the learning rate jumps from {lr_at(3, optim, 4):.3g} to "
            f"{lr_at(4, optim, 8):.3g})")
    assert want in capsys.readouterr().out
    capsys.readouterr()
    train(longer, "lm", shards["lm"], LocalSession(tmp_path))  # the same length again: no note
    assert "note: the checkpoint was written" not in capsys.readouterr().out
