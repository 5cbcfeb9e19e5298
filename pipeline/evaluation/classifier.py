"""Judge generated images with a classifier trained on the real ones.

A small CNN is trained (seeded, a few seconds on CPU) on the real training split. Generated
samples are scored by (a) how often it predicts the class the sampler was asked for and
(b) the Fréchet distance between its penultimate-layer features of generated and of real
held-out images: an FID computed in a feature space that fits these data, not Inception's.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn


class DigitClassifier(nn.Module):
    def __init__(self, channels: int, size: int, num_classes: int, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * ((size + 1) // 2) ** 2, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, steps: int = 400,
                     seed: int = 0) -> DigitClassifier:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = torch.from_numpy(images).float(), torch.from_numpy(labels).long()
    model = DigitClassifier(x.shape[1], x.shape[-1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.enable_grad():  # callers are often under no_grad
        _fit(model, opt, x, y, steps, gen)
    return model.eval()


def _fit(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
         gen: torch.Generator) -> None:
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets (at least 2 rows
    each: one row has no covariance, and scipy's sqrtm of the NaN it gives was a LinAlgError)."""
    if min(len(a), len(b)) < 2:
        raise ValueError(f"eval.samples_per_class: the Frechet distance needs at least 2 images on each side "
                         f"(got {len(a)} and {len(b)}); sample more per class")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = np.eye(len(sa)) * 1e-6  # ReLU features are often rank-deficient; regularise as FID code does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * covmean.real))


@torch.no_grad()
def score_samples(clf: DigitClassifier, samples: torch.Tensor, asked: np.ndarray, real: np.ndarray,
                  real_labels: np.ndarray) -> dict[str, float]:
    real_t = torch.from_numpy(real).float()
    return {
        "classifier_real_accuracy": float((clf(real_t).argmax(1).numpy() == real_labels).mean()),
        "sample_accuracy": float((clf(samples).argmax(1).numpy() == asked).mean()),
        "sample_frechet_distance": frechet_distance(clf.features(samples).numpy(), clf.features(real_t).numpy()),
    }
