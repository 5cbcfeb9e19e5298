"""Diffusion evaluation: held-out denoising loss at fixed noise, and a grid of generated samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config.schema import EvalConfig
from pipeline.data.shard_store import read_split
from pipeline.evaluation.device import model_device
from pipeline.models.diffusion import GaussianDiffusion


@torch.no_grad()
def denoise_loss(model: torch.nn.Module, shards: Path, split: str, cfg: EvalConfig, seed: int = 0) -> float:
    """Same timesteps and noise on every evaluation (seeded), so versions are comparable."""
    process = GaussianDiffusion(model.cfg.diffusion)
    data = read_split(shards, split)
    x_all = torch.from_numpy(data["image"][: cfg.max_batches * cfg.batch_size]).float()
    y_all = torch.from_numpy(data["label"][: len(x_all)]).long()
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    total = 0.0
    for i in range(0, len(x_all), cfg.batch_size):
        x, y = x_all[i : i + cfg.batch_size].to(device), y_all[i : i + cfg.batch_size].to(device)
        total += process.loss(model, x, y, model.num_classes, gen).item() * len(x)
    return total / len(x_all)


@torch.no_grad()
def sample_grid(model: torch.nn.Module, cfg: EvalConfig, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """One row per class (up to sample_rows), sample_cols samples each. Returns (labels, images in [-1, 1])."""
    rows = min(cfg.sample_rows, model.num_classes)
    labels = torch.arange(rows).repeat_interleave(cfg.sample_cols)
    process = GaussianDiffusion(model.cfg.diffusion)
    images = process.sample(model, labels, tuple(model.image_shape), model.num_classes, cfg.sample_steps,
                            cfg.guidance_scale, cfg.sample_eta, generator=torch.Generator().manual_seed(seed))
    return labels.numpy(), images.cpu()


def save_grid(images: torch.Tensor, cols: int, path: Path, scale: int = 4, pad: int = 2) -> None:
    """Tile images (N, C, H, W in [-1, 1]) into a PNG, nearest-neighbour upscaled for viewing."""
    n, c, h, w = images.shape
    rows = (n + cols - 1) // cols
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    hs, ws = h * scale + pad, w * scale + pad
    canvas = np.full((rows * hs + pad, cols * ws + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        tile = arr[i].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
        canvas[pad + r * hs : pad + r * hs + h * scale, pad + k * ws : pad + k * ws + w * scale] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)


@torch.no_grad()
def score_with_classifier(model: torch.nn.Module, shards: Path, cfg: EvalConfig, seed: int = 1) -> dict[str, float]:
    """Sample `samples_per_class` images of every class and score them with a classifier trained on the
    real training split; the real side of the Fréchet distance is the val and test splits."""
    from pipeline.evaluation.classifier import score_samples, train_classifier

    train = read_split(shards, "train")
    clf = train_classifier(train["image"], train["label"], model.num_classes, cfg.classifier_steps, seed)
    held = [read_split(shards, s) for s in ("val", "test")]
    real = np.concatenate([h["image"] for h in held])
    real_labels = np.concatenate([h["label"] for h in held])
    asked = torch.arange(model.num_classes).repeat_interleave(cfg.samples_per_class)
    process = GaussianDiffusion(model.cfg.diffusion)
    samples = process.sample(model, asked, tuple(model.image_shape), model.num_classes, cfg.sample_steps,
                             cfg.guidance_scale, cfg.sample_eta, generator=torch.Generator().manual_seed(seed))
    samples = samples.cpu()  # the classifier runs on the CPU
    return score_samples(clf, samples, asked.numpy(), real, real_labels)
