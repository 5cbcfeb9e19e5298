"""Evaluation metrics: Fréchet distance, the digit classifier, and sample scoring."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config.schema import DiffusionProcessConfig, DiTConfig, EvalConfig
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
    model = DiT(DiTConfig(d_model=32, depth=1, n_heads=2, diffusion=DiffusionProcessConfig(sample_steps=4)),
                (1, 8, 8), num_classes=10).eval()
    m = score_with_classifier(model, shards["diffusion"], EvalConfig(samples_per_class=10, classifier_steps=300))
    assert m["classifier_real_accuracy"] > 0.85  # the judge itself recognises real held-out digits
    assert m["sample_accuracy"] < 0.4  # an untrained denoiser makes noise, not the digits asked for
    assert m["sample_frechet_distance"] > 1.0
