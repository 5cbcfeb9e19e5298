"""Evaluation metrics: Fréchet distance, the digit classifier, and sample scoring."""

from __future__ import annotations

import re

import numpy as np
import torch

from pipeline.config.schema import DiTConfig, EvalConfig
from pipeline.evaluation.classifier import frechet_distance
from pipeline.evaluation.diffusion import score_with_classifier
from pipeline.models.dit import DiT


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    assert frechet_distance(a, a) < 1e-6
    b = rng.normal(size=(4000, 4)) + 0.5  # same covariance, mean moved by 0.5 in each of 4 dims
    assert abs(frechet_distance(a, b) - 4 * 0.25) < 0.1


def test_classifier_scores_untrained_samples_as_chance(built_data):
    _, shards = built_data
    torch.manual_seed(0)
    model = DiT(DiTConfig(d_model=32, depth=1, n_heads=2), (1, 8, 8), num_classes=10).eval()
    m = score_with_classifier(model, shards["diffusion"], EvalConfig(samples_per_class=10, classifier_steps=300,
                                                                    sample_steps=4))
    assert m["classifier_real_accuracy"] > 0.85  # the judge itself recognises real held-out digits
    assert m["sample_accuracy"] < 0.4  # an untrained denoiser makes noise, not the digits asked for
    assert m["sample_frechet_distance"] > 1.0


def test_eval_device_picks_the_gpu_only_where_there_is_one(tmp_path):
    """`eval.device`: auto is the CPU on a machine without CUDA (the GPU where torch sees one);
    cuda there fails before the model is even looked for, naming the key."""
    import pytest

    from pipeline.config import validate
    from pipeline.evaluation.device import eval_device
    from pipeline.flows.evaluate import evaluate
    from tests.conftest import tiny_raw

    assert eval_device("cpu") == torch.device("cpu")
    assert eval_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if torch.cuda.is_available():
        return
    tcfg = validate(tiny_raw(["tasks.lm.eval.device=cuda"])).task("lm")
    with pytest.raises(ValueError, match=r"eval\.device=cuda, but torch .* finds no CUDA device"):
        evaluate(tcfg, tmp_path / "no-model", tmp_path / "no-shards", tmp_path / "m", tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_cpu_generator_drives_a_model_on_another_device():
    """The evaluate stage keeps its seeded CPU generators when the model moves to the GPU: noise,
    timesteps and sampled tokens are drawn on the generator's device and then moved. The meta
    device stands in for CUDA here (a model there computes shapes only); drawing on the model's
    device with a CPU generator is what failed before. (On CUDA: `tests/gpu`, evaluation_on_cuda.)"""
    from pipeline.models.diffusion import GaussianDiffusion

    with torch.device("meta"):
        dit = DiT(DiTConfig(d_model=32, depth=1, n_heads=2), (1, 8, 8), num_classes=10).eval()
    process = GaussianDiffusion(dit.cfg.diffusion)
    gen = torch.Generator().manual_seed(4)
    images = process.sample(dit, torch.arange(3), (1, 8, 8), 10, steps=3, guidance=1.0, eta=1.0, generator=gen)
    assert images.device.type == "meta" and images.shape == (3, 1, 8, 8)
    x = torch.empty(5, 1, 8, 8, device="meta")
    loss = process.loss(dit, x, torch.zeros(5, dtype=torch.long, device="meta"), 10, gen)
    assert loss.device.type == "meta" and loss.shape == ()
    assert gen.initial_seed() == 4 and not torch.equal(gen.get_state(), torch.Generator().manual_seed(4).get_state())


def test_diffusion_evaluation_prints_what_it_does_and_its_progress(built_data, capsys, monkeypatch):
    """Each step of the diffusion evaluation (about a minute on a CPU, which was silent) says what
    it is doing, its progress with an ETA inside its loop, and how long it took."""
    import pipeline.evaluation.diffusion as diffusion

    monkeypatch.setattr(diffusion, "PROGRESS_EVERY_S", 0.0)  # a progress line at every step
    _, shards = built_data
    torch.manual_seed(0)
    model = DiT(DiTConfig(d_model=32, depth=1, n_heads=2), (1, 8, 8), num_classes=10).eval()
    cfg = EvalConfig(max_batches=3, batch_size=4, sample_rows=2, sample_cols=3, samples_per_class=2,
                     classifier_steps=3, sample_steps=4)
    diffusion.denoise_loss(model, shards["diffusion"], "val", cfg)
    diffusion.sample_grid(model, cfg)
    diffusion.score_with_classifier(model, shards["diffusion"], cfg)
    lines = capsys.readouterr().out.splitlines()
    steps = [
        ("val denoise loss over 3 batches of 4", 3, "batches"),
        ("sampling the grid (2x3): 6 images, 4 denoising steps", 4, "steps"),
        ("training the digit classifier that scores the samples: 3 steps", 3, "steps"),
        ("sampling 2 per class to score: 20 images, 4 denoising steps", 4, "steps"),
    ]
    expected = []
    for what, total, unit in steps:
        expected += [f"[diffusion] {what} ..."]
        expected += [f"[diffusion] {what}: {i}/{total} {unit} ({i / total:.0%}), ETA" for i in range(1, total)]
        expected += [f"[diffusion] {what}: done in"]
    assert len(lines) == len(expected), "\n".join(lines)
    for line, want in zip(lines, expected, strict=True):
        if want.endswith(", ETA"):
            assert line.startswith(want[:-len(", ETA")] + ", ") and re.search(r", \d+s, eta \d+s$", line), line
        else:
            assert line.startswith(want), (line, want)
    from torch.optim.optimizer import _global_optimizer_post_hooks

    assert not model._forward_hooks and not _global_optimizer_post_hooks  # the counting hooks are gone again


def test_denoise_loss_does_not_depend_on_the_batch_size(built_data):
    """One generator drew each batch's timesteps and noise in turn, so a row's draw (and the loss:
    1.036 at batch 16, 0.988 at 8, same rows and weights) moved with `eval.batch_size`; each row
    now draws its own by position, as training's validation does."""
    from pipeline.evaluation.diffusion import denoise_loss

    _, shards = built_data
    torch.manual_seed(0)
    model = DiT(DiTConfig(d_model=32, depth=1, n_heads=2), (1, 8, 8), num_classes=10).eval()
    with torch.no_grad():  # (adaLN-Zero's zero output would predict 0 whatever the draws)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    losses = [denoise_loss(model, shards["diffusion"], "val", EvalConfig(max_batches=32 // b, batch_size=b))
              for b in (32, 16, 8, 4)]
    assert max(losses) - min(losses) < 1e-5 * max(losses), losses


def test_frechet_distance_of_one_sample_is_one_line():
    import pytest

    with pytest.raises(ValueError, match=r"^eval\.samples_per_class: the Frechet distance needs at least 2 images"):
        frechet_distance(np.ones((1, 4)), np.random.default_rng(0).normal(size=(10, 4)))
