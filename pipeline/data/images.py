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


def color_jitter(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation of a C x H x W colour image, each scaled by a factor
    drawn from [1 - amount, 1 + amount]."""
    b, c, s = rng.uniform(1 - amount, 1 + amount, size=3)
    img = img * b
    img = (img - img.mean()) * c + img.mean()
    grey = img.mean(axis=0, keepdims=True)
    return (img - grey) * s + grey


def augment(images: np.ndarray, cfg: AugmentConfig, seed: int) -> np.ndarray:
    """`cfg.copies` label-preserving variants per image: small rotation, sub-pixel shift, noise,
    and colour jitter on colour (3-channel) images.

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
            if cfg.color_jitter and a.shape[0] == 3:
                a = color_jitter(a, cfg.color_jitter, rng)
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
    n_classes = int(labels.max()) + 1
    before = np.bincount(labels[index["train"]], minlength=n_classes)
    if cfg.balance == "oversample":
        index["train"] = oversample(index["train"], labels, seed)
    out = {s: (images[idx], labels[idx]) for s, idx in index.items()}
    tx, ty = out["train"]
    if cfg.augment.copies:
        aug = augment(tx, cfg.augment, seed)
        out["train"] = (np.concatenate([tx, aug]), np.concatenate([ty] * (cfg.augment.copies + 1)))
    stats = {
        "balance": cfg.balance,
        "class_counts_train_before_balance": before.tolist(),
        "images_raw": len(images),
        "dropped_duplicates": dedupe.duplicates,
        "image_shape": list(images.shape[1:]),
        "num_classes": n_classes,
        "augmented_copies": cfg.augment.copies,
        **{f"images_{s}": len(v[1]) for s, v in out.items()},
        **{f"class_counts_{s}": np.bincount(v[1], minlength=n_classes).tolist() for s, v in out.items()},
    }
    return {s: (x * 2.0 - 1.0, y) for s, (x, y) in out.items()}, stats


def oversample(index: list[int], labels: np.ndarray, seed: int) -> list[int]:
    """Add seeded repeats of the smaller classes' examples until every class present has as many
    as the largest."""
    rng = np.random.default_rng([seed, 1])
    idx = np.asarray(index)
    by_class = [idx[labels[idx] == c] for c in np.unique(labels[idx])]
    target = max(len(m) for m in by_class)
    extra = [rng.choice(m, target - len(m)) for m in by_class if len(m) < target]
    return sorted([*index, *np.concatenate(extra).tolist()]) if extra else index


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-example loss weights N / (classes present x class count): mean 1, classes weigh alike."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = int((counts > 0).sum())
    return (len(labels) / (present * counts[labels])).astype(np.float32)
