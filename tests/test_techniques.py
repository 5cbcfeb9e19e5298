"""Training techniques chosen by config: optimizers, schedules, plateau and early stopping,
label smoothing, initialisation schemes, v-prediction."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import validate
from pipeline.config.schema import DiffusionProcessConfig, GPTConfig, OptimConfig
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.models.gpt import GPT
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
