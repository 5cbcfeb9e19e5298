"""Prepare labelled images: fixed size and range, de-duplicate, split, augment the training split."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.config.schema import AugmentConfig, ImageDataConfig
from pipeline.data.splits import SPLITS, Deduper, assign_split, content_hash


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of N x C x H x W images to size x size."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    return ndimage.zoom(images, (1, 1, size / h, size / w), order=1).astype(np.float32)


def augment(images: np.ndarray, cfg: AugmentConfig, seed: int) -> np.ndarray:
    """`cfg.copies` label-preserving variants per image: small rotation, sub-pixel shift, noise.

    No flips: a mirrored 2 is not a 2. Values stay in [0, 1].
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(cfg.copies):
        for img in images:
            angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
            dy, dx = rng.uniform(-cfg.shift_px, cfg.shift_px, size=2)
            a = ndimage.rotate(img, angle, axes=(1, 2), reshape=False, order=1, mode="constant")
            a = ndimage.shift(a, (0, dy, dx), order=1, mode="constant")
            a = a + rng.normal(0.0, cfg.noise_std, size=a.shape)
            out.append(np.clip(a, 0.0, 1.0).astype(np.float32))
    return np.stack(out) if out else images[:0]


def prepare_images(
    images: np.ndarray, labels: np.ndarray, cfg: ImageDataConfig, seed: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Returns {split: (images in [-1, 1], labels)} and statistics (with class balance per split)."""
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"expected N x C x H x W images and N labels, got {images.shape} and {labels.shape}")
    images = np.clip(resize(images.astype(np.float32), cfg.image_size), 0.0, 1.0)
    dedupe = Deduper()
    index: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, img in enumerate(images):
        # Quantise before hashing so float noise from resizing does not hide exact repeats.
        digest = content_hash(np.round(img * 255).astype(np.uint8).tobytes() + bytes([int(labels[i]) % 256]))
        if not dedupe.seen(digest):
            index[assign_split(digest, cfg.split, seed)].append(i)
    out = {s: (images[idx], labels[idx]) for s, idx in index.items()}
    tx, ty = out["train"]
    if cfg.augment.copies:
        aug = augment(tx, cfg.augment, seed)
        out["train"] = (np.concatenate([tx, aug]), np.concatenate([ty] * (cfg.augment.copies + 1)))
    n_classes = int(labels.max()) + 1
    stats = {
        "images_raw": len(images),
        "dropped_duplicates": dedupe.duplicates,
        "image_shape": list(images.shape[1:]),
        "num_classes": n_classes,
        "augmented_copies": cfg.augment.copies,
        **{f"images_{s}": len(v[1]) for s, v in out.items()},
        **{f"class_counts_{s}": np.bincount(v[1], minlength=n_classes).tolist() for s, v in out.items()},
    }
    return {s: (x * 2.0 - 1.0, y) for s, (x, y) in out.items()}, stats
