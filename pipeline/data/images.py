"""Prepare labelled images: fixed size and range, de-duplicate, split, augment the training split."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.config.schema import AugmentConfig, ImageDataConfig, SplitConfig
from pipeline.data.splits import SPLITS, assign_split, check_splits, content_hash


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of N x C x H x W images to size x size."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    return ndimage.zoom(images, (1, 1, size / h, size / w), order=1).astype(np.float32, copy=False)


def color_jitter(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation of a C x H x W colour image, each scaled by a factor
    drawn from [1 - amount, 1 + amount]."""
    b, c, s = rng.uniform(1 - amount, 1 + amount, size=3)
    img = img * b
    img = (img - img.mean()) * c + img.mean()
    grey = img.mean(axis=0, keepdims=True)
    return (img - grey) * s + grey


def augment(images: np.ndarray, cfg: AugmentConfig, seed: int, out: np.ndarray | None = None) -> np.ndarray:
    """`cfg.copies` label-preserving variants per image: small rotation, sub-pixel shift, noise,
    and colour jitter on colour (3-channel) images.

    No flips: a mirrored 2 is not a 2. Values stay in [0, 1]. Written into `out` when given
    (copies x N float32 images: prepare passes the tail of the training array, so the copies are
    never held twice), else into a new array.
    """
    rng = np.random.default_rng(seed)
    if out is None:
        out = np.empty((cfg.copies * len(images), *images.shape[1:]), dtype=np.float32)
    k = 0
    for _ in range(cfg.copies):
        for img in images:
            angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
            dy, dx = rng.uniform(-cfg.shift_px, cfg.shift_px, size=2)
            a = ndimage.rotate(img, angle, axes=(1, 2), reshape=False, order=1, mode="constant")
            a = ndimage.shift(a, (0, dy, dx), order=1, mode="constant")
            if cfg.color_jitter and a.shape[0] == 3:
                a = color_jitter(a, cfg.color_jitter, rng)
            a = a + rng.normal(0.0, cfg.noise_std, size=a.shape)
            out[k] = np.clip(a, 0.0, 1.0)  # (cast to float32 on assignment, as astype would)
            k += 1
    return out


def split_index(images: np.ndarray, labels: np.ndarray,
                split: SplitConfig) -> tuple[dict[str, list[int]], int, int]:
    """({split: indices of the images kept}, exact duplicates dropped, images kept that repeat
    another's pixels under a different label).

    An image's split is a hash of its pixels (and `split.seed`) alone, never its label: labels are class-folder
    indices that renumber when a class is added, so a label in the hash moved old images between
    splits, and the same picture under two labels landed in train and test. A repeat of pixels
    and label is dropped; the same pixels under another label (a mislabelled copy, or a picture
    that fits two classes) are kept, in the same split as the first, so neither order nor
    labels decide which one survives and none leaks into a held-out split. Pixels are quantised
    to 8 bits first, so float noise from resizing does not hide exact repeats."""
    seen: dict[str, set[int]] = {}
    index: dict[str, list[int]] = {s: [] for s in SPLITS}
    duplicates = other_label = 0
    for i, img in enumerate(images):
        digest = content_hash(np.round(img * 255).astype(np.uint8).tobytes())
        label = int(labels[i])
        known = seen.setdefault(digest, set())
        if label in known:
            duplicates += 1
            continue
        other_label += bool(known)
        known.add(label)
        index[assign_split(digest, split)].append(i)
    return index, duplicates, other_label


def prepare_images(
    images: np.ndarray, labels: np.ndarray, cfg: ImageDataConfig, seed: int,
    split_key: str = "tasks.diffusion.data.split",
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Returns {split: (float32 images in [-1, 1], labels)} and statistics (with class balance
    per split). `seed` seeds oversampling and augmentation; the split is keyed by
    `cfg.split.seed` (`split_index`). A split left empty is a `DataSourceError` naming
    `split_key` here, not a failure at shard or evaluation time.

    Memory: one float32 copy of the kept images (split arrays, the training one preallocated
    for its augmented copies), scaled in place; the input is never modified."""
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"expected N x C x H x W images and N labels, got {images.shape} and {labels.shape}")
    images = resize(np.asarray(images, dtype=np.float32), cfg.image_size)
    if images.min() < 0.0 or images.max() > 1.0:  # (read_images gives [0, 1]; only a caller's own array copies)
        images = np.clip(images, 0.0, 1.0)
    index, duplicates, other_label = split_index(images, labels, cfg.split)
    check_splits({s: len(index[s]) for s in SPLITS}, split_key,
                 f"images of {len(images)} read, {duplicates} exact duplicates dropped")
    n_classes = int(labels.max()) + 1
    before = np.bincount(labels[index["train"]], minlength=n_classes)
    if cfg.balance == "oversample":
        index["train"] = oversample(index["train"], labels, seed)
    out = {s: (images[idx], labels[idx]) for s, idx in index.items() if s != "train"}
    train, copies = np.asarray(index["train"], dtype=np.int64), cfg.augment.copies
    tx = np.empty(((copies + 1) * len(train), *images.shape[1:]), dtype=np.float32)
    np.take(images, train, axis=0, out=tx[:len(train)], mode="clip")  # (mode="raise" buffers a copy)
    if copies:
        augment(tx[:len(train)], cfg.augment, seed, out=tx[len(train):])
    out = {"train": (tx, np.tile(labels[train], copies + 1)), **out}
    stats = {
        "balance": cfg.balance,
        "class_counts_train_before_balance": before.tolist(),
        "images_raw": len(images),
        "dropped_duplicates": duplicates,
        "kept_same_pixels_other_label": other_label,
        "image_shape": list(images.shape[1:]),
        "num_classes": n_classes,
        "augmented_copies": cfg.augment.copies,
        **{f"images_{s}": len(v[1]) for s, v in out.items()},
        **{f"class_counts_{s}": np.bincount(v[1], minlength=n_classes).tolist() for s, v in out.items()},
    }
    for x, _ in out.values():  # to [-1, 1], in place (each split array is prepare's own copy)
        np.multiply(x, 2.0, out=x)
        np.subtract(x, 1.0, out=x)
    return out, stats


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
