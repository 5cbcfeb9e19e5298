"""Diffusion evaluation: held-out denoising loss at fixed noise, and a grid of generated samples.

Each step says what it is doing as it starts and how long it took, and inside its loop prints a
line with its progress and an ETA every `PROGRESS_EVERY_S` seconds: on a CPU the whole evaluation
takes about a minute, which was silent in the stage's log. Plain lines rather than a bar: DVC's
log is no terminal, and a bar there is one line of carriage returns.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.atomic import atomic_write_bytes
from pipeline.config.schema import EvalConfig
from pipeline.data.shard_store import read_split
from pipeline.evaluation.device import model_device
from pipeline.models.diffusion import GaussianDiffusion, row_generators
from pipeline.progress import Progress

PROGRESS_EVERY_S = 5.0  # at most one progress line this often inside a loop (a test sets 0: every step)


def _progress(what: str, total: int, unit: str) -> Progress:
    """Lines of one evaluation step (`PROGRESS_EVERY_S` read at each step's start)."""
    return Progress("[diffusion]", what, total, unit, every_s=PROGRESS_EVERY_S)


@contextlib.contextmanager
def _steps_of_model(model: torch.nn.Module, progress: Progress) -> Iterator[None]:
    """Count the model's forward calls as steps (the sampler calls it once per denoising step,
    guidance included: both halves go in one batch), without touching the sampler."""
    handle = model.register_forward_hook(lambda *_: progress.step())
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _steps_of_optimizer(progress: Progress) -> Iterator[None]:
    """Count optimizer steps as steps (the classifier's training loop takes one per batch); the
    hook is global, so it is held only around the one call that trains."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda *_: progress.step())
    try:
        yield
    finally:
        handle.remove()


def _sample(process: GaussianDiffusion, model: torch.nn.Module, labels: torch.Tensor, cfg: EvalConfig,
            seed: int, what: str) -> torch.Tensor:
    """`process.sample` with `cfg`'s settings and a seeded CPU generator per image (`row_generators`:
    the images a served request with this seed gets, and a class's samples differ), reporting its
    progress."""
    steps = min(cfg.sample_steps, process.cfg.timesteps)  # (the sampler caps them so too)
    progress = _progress(f"{what}: {len(labels)} images, {steps} denoising steps", steps, "steps")
    with _steps_of_model(model, progress):
        images = process.sample(model, labels, tuple(model.image_shape), model.num_classes, cfg.sample_steps,
                                cfg.guidance_scale, cfg.sample_eta, generator=row_generators(seed, len(labels)))
    progress.finish()
    return images


@torch.no_grad()
def denoise_loss(model: torch.nn.Module, shards: Path, split: str, cfg: EvalConfig, seed: int = 0) -> float:
    """Same timesteps and noise on every evaluation, so versions are comparable: each row's own,
    drawn by its position (`row_draws`, as training's validation draws them), so the
    loss does not depend on `eval.batch_size` either (one generator drawing batch after batch gave
    each row another draw at another batch size: 1.036 at 16, 0.988 at 8, same rows and weights)."""
    from pipeline.models.diffusion import row_draws

    process = GaussianDiffusion(model.cfg.diffusion)
    data = read_split(shards, split, cfg.max_batches * cfg.batch_size)  # (only the rows scored)
    x_all = torch.from_numpy(data["image"][: cfg.max_batches * cfg.batch_size]).float()
    y_all = torch.from_numpy(data["label"][: len(x_all)]).long()
    device = model_device(model)
    total = 0.0
    batches = -(-len(x_all) // cfg.batch_size)
    progress = _progress(f"{split} denoise loss over {batches} batches of {cfg.batch_size}", batches, "batches")
    for i in range(0, len(x_all), cfg.batch_size):
        x, y = x_all[i : i + cfg.batch_size].to(device), y_all[i : i + cfg.batch_size].to(device)
        t, noise = row_draws(range(i, i + len(x)), seed, process.cfg.timesteps, tuple(x.shape[1:]))
        total += process.loss(model, x, y, model.num_classes, t=t.to(device), noise=noise.to(device)).item() * len(x)
        progress.step()
    progress.finish()
    return total / len(x_all)


@torch.no_grad()
def sample_grid(model: torch.nn.Module, cfg: EvalConfig, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """One row per class (up to sample_rows), sample_cols samples each. Returns (labels, images in [-1, 1])."""
    rows = min(cfg.sample_rows, model.num_classes)
    labels = torch.arange(rows).repeat_interleave(cfg.sample_cols)
    process = GaussianDiffusion(model.cfg.diffusion)
    images = _sample(process, model, labels, cfg, seed, f"sampling the grid ({rows}x{cfg.sample_cols})")
    return labels.numpy(), images.cpu()


def save_grid(images: torch.Tensor, cols: int, path: Path, scale: int = 4, pad: int = 2) -> None:
    """Tile images (N, C, H, W in [-1, 1]) into a PNG, nearest-neighbour upscaled for viewing,
    written atomically (a DVC output and plot: a half-written one would replace the last good one)."""
    n, c, h, w = images.shape
    rows = (n + cols - 1) // cols
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    hs, ws = h * scale + pad, w * scale + pad
    canvas = np.full((rows * hs + pad, cols * ws + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        tile = arr[i].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
        canvas[pad + r * hs : pad + r * hs + h * scale, pad + k * ws : pad + k * ws + w * scale] = tile
    encoded = io.BytesIO()  # whole before it replaces the last grid: a kill mid-save leaves that one intact
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(encoded, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encoded.getvalue())


@torch.no_grad()
def score_with_classifier(model: torch.nn.Module, shards: Path, cfg: EvalConfig, seed: int = 1) -> dict[str, float]:
    """Sample `samples_per_class` images of every class and score them with a classifier trained on the
    real training split; the real side of the Fréchet distance is the val and test splits."""
    from pipeline.evaluation.classifier import score_samples, train_classifier

    train = read_split(shards, "train")
    progress = _progress(f"training the digit classifier that scores the samples: {cfg.classifier_steps} steps",
                        cfg.classifier_steps, "steps")
    with _steps_of_optimizer(progress):
        clf = train_classifier(train["image"], train["label"], model.num_classes, cfg.classifier_steps, seed)
    progress.finish()
    held = [read_split(shards, s) for s in ("val", "test")]
    real = np.concatenate([h["image"] for h in held])
    real_labels = np.concatenate([h["label"] for h in held])
    asked = torch.arange(model.num_classes).repeat_interleave(cfg.samples_per_class)
    process = GaussianDiffusion(model.cfg.diffusion)
    samples = _sample(process, model, asked, cfg, seed, f"sampling {cfg.samples_per_class} per class to score")
    samples = samples.cpu()  # the classifier runs on the CPU
    return score_samples(clf, samples, asked.numpy(), real, real_labels)
