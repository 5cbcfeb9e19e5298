"""The training loop in one process: exact resume, accumulation, non-finite stop, checkpoints."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.config import validate
from pipeline.data.build import shard
from pipeline.training.checkpoint import CheckpointError, load_training_state, read_meta
from pipeline.training.loop import NonFiniteError, train
from pipeline.training.optim import lr_at
from pipeline.training.session import LocalSession
from tests.conftest import ROOT, tiny_raw


def _weights(ckpt_dir):
    state, meta = load_training_state(sorted(ckpt_dir.glob("checkpoint_*"))[-1])
    weights = dict(state["model"])
    weights.update({f"ema.{k}": v for k, v in state["extra"].get("ema", {}).items()})  # EMA must resume exactly too
    return weights, meta


@pytest.mark.parametrize("task", ["lm", "diffusion", "lm-dropout"])
def test_resume_equals_uninterrupted(built_data, tmp_path, task):
    """Bit for bit, with dropout too (its masks come from the global RNG, seeded per step and
    data-parallel rank: it was seeded once, so a resumed run drew other masks)."""
    cfg, shards = built_data
    if task == "lm-dropout":
        from pipeline.config.loading import apply_overrides

        cfg = validate(apply_overrides(cfg.model_dump(mode="json"), ["tasks.lm.model.dropout=0.1"]))
        task = "lm"
    straight = train(cfg, task, shards[task], LocalSession(tmp_path / "a"))
    ref, meta = _weights(tmp_path / "a")
    assert straight.step == 6 and meta["final"]

    # "Kill" after the step-3 checkpoint: keep only it, then resume in a fresh loop.
    (tmp_path / "b").mkdir()
    shutil.copytree(sorted((tmp_path / "a").glob("checkpoint_*"))[0], tmp_path / "b" / "checkpoint_00000003")
    kept = read_meta(tmp_path / "b" / "checkpoint_00000003")["train_seconds"]
    resumed = train(cfg, task, shards[task], LocalSession(tmp_path / "b"))
    got, resumed_meta = _weights(tmp_path / "b")
    assert resumed.step == 6
    # the training time runs on over the starts (train.json counted only the last start's)
    assert 0 < kept < resumed_meta["train_seconds"] and resumed.train_seconds == resumed_meta["train_seconds"]
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_live_metrics_progress_lines_and_the_steps_the_session_sees(built_data, tmp_path, capsys):
    """Each logged step reaches the session (the live MLflow logger on Ray) as it happens, and
    the stage prints step / total, loss, throughput and an ETA."""
    cfg, shards = built_data
    seen: list[dict] = []

    class Watching(LocalSession):
        def log_step(self, entry):
            seen.append(dict(entry))

    state = train(cfg, "lm", shards["lm"], Watching(tmp_path))
    assert seen == state.history and [h["step"] for h in seen] == [2, 3, 4, 6]  # log_every 2, ckpt_every 3
    lines = [line for line in capsys.readouterr().out.splitlines() if "| eta " in line]
    assert [line.split(" | ")[0] for line in lines] == [f"[lm] step {s}/6" for s in (2, 3, 4, 6)]
    assert "tokens/s" in lines[0] and lines[-1].endswith("eta 0s")


def test_resuming_a_finished_run_reports_its_final_checkpoint(built_data, tmp_path):
    cfg, shards = built_data
    first = train(cfg, "lm", shards["lm"], LocalSession(tmp_path))
    again = LocalSession(tmp_path)
    state = train(cfg, "lm", shards["lm"], again)
    assert state.step == 6 and again.reports == [state.history[-1]]
    assert _weights(tmp_path)[1]["final"]
    assert state.train_seconds == first.train_seconds > 0  # (the run's, not the few seconds of this start)


def test_gradient_accumulation_matches_one_big_batch(built_data, tmp_path):
    cfg, shards = built_data
    raw = cfg.model_dump(mode="json")
    raw["tasks"]["lm"]["trainer"]["grad_accum_steps"] = 2
    accum = validate(raw)
    train(cfg, "lm", shards["lm"], LocalSession(tmp_path / "one"))
    train(accum, "lm", shards["lm"], LocalSession(tmp_path / "two"))
    a, _ = _weights(tmp_path / "one")
    b, _ = _weights(tmp_path / "two")
    for k in a:  # same samples, same mean loss; only summation order differs
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(built_data, tmp_path, dtype):
    cfg, shards = built_data
    raw = cfg.model_dump(mode="json")
    raw["precision"]["dtype"] = dtype
    state = train(validate(raw), "lm", shards["lm"], LocalSession(tmp_path))
    assert state.step == 6 and np.isfinite(state.history[-1]["loss"])
    assert state.history[-1]["loss"] < state.history[0]["loss"] + 0.5
    saved, _ = load_training_state(sorted(tmp_path.glob("checkpoint_*"))[-1])
    assert bool(saved["scaler"]) == (dtype == "fp16")  # the loss scale is part of the checkpoint


def test_nonfinite_data_stops_the_run_with_a_report(tmp_path, built_data):
    cfg, shards = built_data
    import json

    prepared = tmp_path / "prepared"
    shutil.copytree(shards["diffusion"].parent / "prepared", prepared)
    for split in ("train", "val", "test"):
        with np.load(prepared / f"{split}.npz") as z:
            images, labels = z["images"].copy(), z["labels"]
        images[:] = np.nan
        np.savez(prepared / f"{split}.npz", images=images, labels=labels)
    json.loads((prepared / "stats.json").read_text())
    shard(cfg.task("diffusion").data, prepared, tmp_path / "shards")
    raw = cfg.model_dump(mode="json")
    raw["tasks"]["diffusion"]["trainer"]["max_nonfinite_in_a_row"] = 3
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite loss"):
        train(validate(raw), "diffusion", tmp_path / "shards", LocalSession(tmp_path / "ck"))


def test_a_run_of_nonfinite_steps_across_a_checkpoint_counts_on_after_resume(tmp_path, built_data, monkeypatch):
    """Steps 3, 4 and 5 have non-finite gradients and the limit is 3 in a row: the uninterrupted run
    stops at step 5, and so does a run resumed from the step-3 checkpoint (which records the one
    non-finite step it ended with; the count restarted at 0 there, so the resumed run trained on)."""
    import json

    from pipeline.distributed.ddp import DDPStrategy

    _, shards = built_data
    cfg = validate(tiny_raw(["tasks.lm.trainer.max_nonfinite_in_a_row=3", "tasks.lm.trainer.ckpt_every=3",
                             "tasks.lm.trainer.log_every=1", "tasks.lm.trainer.max_steps=8"]))
    calls = {"step": 0}
    forward_backward = DDPStrategy.forward_backward

    def bad_stretch(self, micro_batches, task, generator):  # a bad stretch of data at steps 3-5
        calls["step"] += 1
        loss = forward_backward(self, micro_batches, task, generator)
        if calls["step"] in (3, 4, 5):
            for p in self.model.parameters():
                p.grad.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(DDPStrategy, "forward_backward", bad_stretch)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row had a non-finite .* at step 5;"):
        train(cfg, "lm", shards["lm"], LocalSession(tmp_path / "straight"))
    cut = tmp_path / "straight" / "checkpoint_00000003"
    assert json.loads((cut / "meta.json").read_text())["nonfinite_in_a_row"] == 1
    shutil.copytree(cut, tmp_path / "resumed" / cut.name)
    calls["step"] = 3
    with pytest.raises(NonFiniteError, match=r"3 steps in a row had a non-finite .* at step 5;"):
        train(cfg, "lm", shards["lm"], LocalSession(tmp_path / "resumed"))


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_training_state(tmp_path)


def test_ema_update_follows_the_formula():
    from pipeline.training.ema import EMA

    model = torch.nn.Linear(2, 1)
    ema = EMA(model.state_dict(), decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model.state_dict(), step=100)  # decay = min(0.9, 101 / 110) = 0.9
    expected = 0.9 * start["weight"] + 0.1 * model.weight
    assert torch.allclose(ema.state_dict()["weight"], expected)
    ema.update(model.state_dict(), step=0)  # warm-up: decay = 1 / 10
    assert torch.allclose(ema.state_dict()["weight"], 0.1 * expected + 0.9 * model.weight)


def test_lr_schedule_warms_up_then_decays():
    from pipeline.config.schema import OptimConfig

    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert lr_at(40, cfg, 100) > lr_at(60, cfg, 100)


def test_batch_must_split_evenly(built_data, tmp_path):
    raw = tiny_raw(["tasks.lm.trainer.global_batch_size=7", "tasks.lm.trainer.grad_accum_steps=2"])
    _, shards = built_data
    with pytest.raises(ValueError, match="global_batch_size \\(7\\) must be divisible"):
        train(validate(raw), "lm", shards["lm"], LocalSession(tmp_path))


def test_unet_denoiser_trains_through_the_loop(built_data, tmp_path):
    from pipeline.config import compose
    from pipeline.config.loading import apply_overrides
    from tests.conftest import TINY

    _, shards = built_data
    raw = apply_overrides(compose(ROOT / "configs", ["model@tasks.diffusion.model=unet_tiny"]), [
        *TINY, "tasks.diffusion.trainer.max_steps=30", "tasks.diffusion.trainer.log_every=10",
        "tasks.diffusion.trainer.ckpt_every=30"])
    state = train(validate(raw), "diffusion", shards["diffusion"], LocalSession(tmp_path))
    # The output starts at zero, so the eps-MSE starts near 1 and must fall.
    assert state.step == 30 and state.history[-1]["loss"] < 0.8 * state.history[0]["loss"]


@pytest.mark.parametrize("override", [
    "tasks.lm.eval.max_batches=7", "tasks.lm.export.hf=false", "tasks.lm.registry.name=other",
    "tasks.lm.trainer.log_every=5", "tasks.lm.trainer.ckpt_every=50", "tasks.lm.trainer.keep_last_k=1",
    "tasks.lm.trainer.prefetch_batches=0", "tasks.lm.trainer.eval_every=3",
])
def test_run_identity_resumes_across_harmless_changes(override):
    """A rerun after changing only how the run is observed, checkpointed or exported keys the
    same run (so it resumes it); anything that changes the weights keys another."""
    from pipeline.config import config_digest
    from pipeline.flows.train import run_identity

    def name(*extra: str) -> str:
        return config_digest(run_identity(validate(tiny_raw(list(extra))), "lm", "md5"))

    assert name(override) == name()
    for weighty in ("tasks.lm.optim.lr=0.5", "tasks.lm.trainer.max_steps=7", "seed=3",
                    "tasks.lm.trainer.shuffle_window=2", "tasks.lm.model.d_model=96"):
        assert name(override, weighty) != name(override), weighty
    # validation counts where the loop acts on it
    assert name("tasks.lm.trainer.early_stop_patience=2", "tasks.lm.trainer.eval_every=3") != \
        name("tasks.lm.trainer.early_stop_patience=2", "tasks.lm.trainer.eval_every=2")
    best = "tasks.lm.trainer.export_weights=best"  # another step's weights go on
    assert name(best, "tasks.lm.trainer.eval_every=3") not in (name("tasks.lm.trainer.eval_every=3"),
                                                               name(best, "tasks.lm.trainer.eval_every=2"))


@pytest.mark.parametrize("override", ["tasks.diffusion.eval.sample_steps=50", "tasks.diffusion.eval.sample_eta=0.0",
                                      "tasks.diffusion.eval.guidance_scale=3.0"])
def test_run_identity_of_a_diffusion_run_ignores_its_sampler(override):
    """The sampler (steps, eta, guidance) lived in the model's config, so trying another
    guidance scale trained a new run from scratch; it is now the eval section's and keys nothing,
    and DVC's train stage does not depend on it (the export stage does: sampler.json)."""
    import yaml

    from pipeline.config import config_digest
    from pipeline.config.loading import load_config
    from pipeline.flows.train import run_identity

    def name(*extra: str) -> str:
        return config_digest(run_identity(validate(tiny_raw(list(extra))), "diffusion", "md5"))

    assert name(override) == name()
    assert name("tasks.diffusion.model.diffusion.cond_drop_prob=0.2") != name()
    # the repository's diffusion config keeps the run name it had while the sampler was in the model
    # (computed with the code of fa4f0e1 on its params.yaml): its runs resume after the upgrade
    params = load_config(ROOT / "params.yaml")
    assert config_digest(run_identity(params, "diffusion", "md5")) == "cb89c8751900", \
        "params.yaml's diffusion task changed since fa4f0e1? Then this upgrade pin has served: drop it"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    key = override.split("=")[0]
    assert not any(key.replace("tasks.diffusion.", "tasks.${item}.").startswith(p)
                   for p in stages["train"]["do"]["params"] if isinstance(p, str))
    # export@diffusion keys on it (its entries name it); export@lm names no eval key (the LM's sampler
    # keys are unused: changing them exported and registered the LM again)
    export = stages["export"]
    entries = [export["foreach"][task].get(p[7:-1], p) if p.startswith("${item.") else p.replace("${key}", task)
               for task in ("lm", "diffusion") for p in export["do"]["params"]]
    assert key in entries and not any(".eval." in e for e in entries if e.startswith("tasks.lm."))


def test_run_identity_keys_fp8_settings_only_under_fp8():
    """The fp8 settings added to `precision` key a run only when it trains in fp8: other runs keep
    the names they had before the settings existed, so an interrupted run resumes after an upgrade."""
    from pipeline.flows.train import run_identity

    def precision(*extra: str) -> dict:
        return run_identity(validate(tiny_raw(list(extra))), "lm", "md5")["precision"]

    assert precision() == {"dtype": "fp32"} and precision("precision.dtype=bf16") == {"dtype": "bf16"}
    assert precision("precision.dtype=bf16", "precision.fp8_all_gather=false") == {"dtype": "bf16"}
    fp8 = precision("precision.dtype=fp8", "cluster.use_gpu=true")
    assert fp8 == {"dtype": "fp8", "fp8_emulate": False, "fp8_all_gather": True}


def test_elastic_worker_count_keys_the_same_run_where_a_checkpoint_reshards():
    """The same samples with the same global batch at any worker count: under DDP, FSDP2 and
    Horovod a rerun on other workers resumes the run; DeepSpeed's checkpoint cannot follow, so
    its worker count keys another run."""
    from pipeline.config import config_digest
    from pipeline.flows.train import run_identity

    def name(*extra: str) -> str:
        return config_digest(run_identity(validate(tiny_raw(list(extra))), "lm", "md5"))

    for strategy in ("strategy.name=ddp", "strategy.name=fsdp"):
        assert name(strategy, "cluster.num_workers=4") == name(strategy, "cluster.num_workers=1")
    zero = "strategy.name=deepspeed"
    assert name(zero, "cluster.num_workers=4") != name(zero, "cluster.num_workers=1")


def test_cuda_allocator_settings_apply_once_and_the_users_win(monkeypatch):
    """`cluster.cuda_alloc_conf` (expandable segments by default) reaches the allocator of a GPU
    worker through torch's settings call and the environment (for the processes it starts); a
    PYTORCH_CUDA_ALLOC_CONF the user set is left as it is, and "" keeps torch's default. (The
    CUDA side, segments really mapped expandable, is checked by tests/gpu.)"""
    from pipeline.runtime.cuda_allocator import ENV, configure_cuda_allocator

    applied: list[str] = []
    monkeypatch.delenv(ENV, raising=False)
    assert validate(tiny_raw()).cluster.cuda_alloc_conf == "expandable_segments:True"
    assert configure_cuda_allocator("", applied.append) is None and applied == [] and ENV not in os.environ
    assert configure_cuda_allocator("expandable_segments:True", applied.append) == "expandable_segments:True"
    assert applied == ["expandable_segments:True"] and os.environ[ENV] == "expandable_segments:True"
    monkeypatch.setenv(ENV, "max_split_size_mb:128")
    assert configure_cuda_allocator("expandable_segments:True", applied.append) == "max_split_size_mb:128"
    assert applied == ["expandable_segments:True"] and os.environ[ENV] == "max_split_size_mb:128"


def test_validation_runs_in_the_training_micro_batches(built_data, tmp_path, monkeypatch):
    """Validation forwards the micro-batch the step was sized for, not a rank's whole share of a
    global batch (grad_accum_steps times its activations, which the memory planner does not plan)."""
    from pipeline.tasks.lm import LanguageModeling

    rows: dict[bool, set[int]] = {True: set(), False: set()}
    original = LanguageModeling.loss

    def loss(self, model, batch, generator=None):
        rows[model.training].add(len(next(iter(batch.values()))))
        return original(self, model, batch, generator)

    monkeypatch.setattr(LanguageModeling, "loss", loss)
    cfg = validate(tiny_raw(["tasks.lm.trainer.max_steps=2", "tasks.lm.trainer.global_batch_size=16",
                             "tasks.lm.trainer.grad_accum_steps=4", "tasks.lm.trainer.eval_every=1",
                             "tasks.lm.trainer.eval_batches=2"]))
    state = train(cfg, "lm", built_data[1]["lm"], LocalSession(tmp_path))
    assert rows == {True: {4}, False: {4}}, rows
    assert all(math.isfinite(h["val_loss"]) for h in state.history)
