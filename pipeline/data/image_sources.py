"""Raw images: the bundled 8x8 digits (scikit-learn's), an `.npz` of arrays, or a folder of
class sub-folders, read as float32 in [0, 1], N x C x H x W, scaled by dtype or image mode
(floats: [0, 1] or [-1, 1] by a minimum clearly in one, never by a stray value; `_unit_range`).
Text sources are `sources.py`'s."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.data.sources import DataSourceError, filesystem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Up to this many classes an .npz may hold fewer images than classes (a small subset of CIFAR-100, say);
# beyond it, a largest label above the image count is a mistake (a label of 100,000: as many class rows).
MAX_SPARSE_CLASSES = 1000


def read_images(source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (images float32 in [0, 1] as N x C x H x W, integer labels, number of classes)."""
    if source == "builtin:digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images.astype(np.float32) / 16.0)[:, None]
        return images, d.target.astype(np.int64), 10
    if source.startswith("builtin:"):
        raise DataSourceError(f"data.source: unknown builtin image set '{source}' (known: builtin:digits)")
    fs, path = filesystem(source)  # local or s3://, like text
    if not fs.exists(path):
        raise DataSourceError(f"data.source: '{source}' does not exist")
    if path.lower().endswith(".npz"):  # any case, like text suffixes: IMAGES.NPZ
        images, labels = _read_npz(fs, path, source)
        images = _unit_range(images, source)
        if images.ndim == 3:
            images = images[:, None]
        return images, labels, int(labels.max()) + 1
    if fs.isdir(path):
        return _read_class_folders(fs, path, source)
    raise DataSourceError(f"data.source: '{source}' is neither an .npz file nor a folder of class folders")


# Float pixels this far outside their range are round-off (float16 storage rounds 1.0 by up to 5e-4;
# float32 arithmetic by 1e-7), clipped back in; further out, the file is not in the range it seems to be.
ROUND_OFF = 1e-3
# A float set is [-1, 1] when its darkest pixel is at most this: 25% grey in [-1, 1], and never
# round-off in [0, 1]. A minimum between this and -ROUND_OFF fits neither range: an error, not a guess.
MINUS_ONE_MIN = -0.5


def _unit_range(images: np.ndarray, source: str) -> np.ndarray:
    """float32 images in [0, 1], scaled by the array's dtype, never guessed from a stray value (a
    dark uint8 set or a [-1, 1] float set would be scaled wrongly, and a clip would hide it):
    uint8 / 255, uint16 / 65535, bool as 0 / 1. Floats are [0, 1] when the minimum is at least
    -ROUND_OFF (a pixel at -1e-6 is round-off, not a sign of [-1, 1]: reading it so halved the
    contrast of the whole set) and [-1, 1], mapped to [0, 1], when it is at most MINUS_ONE_MIN;
    round-off beyond the range is clipped. Anything else (floats 0..255, a minimum between the
    two, other integer types) is a `DataSourceError` naming the file, the dtype and the range.
    Scaled in place (`images` is the array just loaded): at most one float32 copy of the data."""
    lo, hi = images.min().item(), images.max().item()
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.bool_): 1.0}.get(images.dtype)
    if scale is not None:
        out = images.astype(np.float32)
        if scale != 1.0:
            np.divide(out, scale, out=out)
        return out
    unit = lo >= -ROUND_OFF
    if images.dtype.kind == "f" and hi <= 1.0 + ROUND_OFF and (unit or -1.0 - ROUND_OFF <= lo <= MINUS_ONE_MIN):
        out = images.astype(np.float32, copy=False)
        if not unit:  # [-1, 1] (already normalised for a diffusion model): back to [0, 1]
            np.add(out, 1.0, out=out)
            np.divide(out, 2.0, out=out)
        return np.clip(out, 0.0, 1.0, out=out)
    rule = (f"images are read by dtype: uint8 (0..255), uint16 (0..65535), or floats in [0, 1] (minimum at least "
            f"{-ROUND_OFF:g}) or [-1, 1] (minimum at most {MINUS_ONE_MIN:g}), give or take {ROUND_OFF:g}; rescale "
            "the file to one of these")
    raise DataSourceError(f"{source}: 'images' are {images.dtype} from {lo:g} to {hi:g}; {rule}")


def _read_npz(fs, path: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, int64 labels) of an image .npz, checked here so that a damaged archive or bad
    values stop prepare with one line naming the file, not a zipfile traceback or silently
    truncated labels, NaN pixels or a hundred thousand empty classes further on."""
    import zipfile
    import zlib

    try:
        with fs.open(path, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataSourceError(f"{source}: a single .npy array, not an .npz with arrays 'images' and 'labels'")
            with z:
                if "images" not in z or "labels" not in z:
                    raise DataSourceError(f"{source}: an image .npz needs arrays 'images' and 'labels'")
                images, labels = z["images"], z["labels"]
    except DataSourceError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:  # truncated, not a zip, pickled
        raise DataSourceError(f"{source}: not a readable .npz file ({' '.join(str(e).split()) or type(e).__name__})"
                              ) from None
    if images.dtype.kind not in "biuf" or images.ndim not in (3, 4) or images.size == 0:
        raise DataSourceError(f"{source}: 'images' must be a non-empty N x H x W or N x C x H x W array of numbers "
                              f"(got shape {images.shape}, dtype {images.dtype})")
    if images.ndim == 4 and images.shape[1] not in (1, 3, 4):  # (the sample grid and PNGs know these)
        hint = " (channels last? transpose it to N x C x H x W)" if images.shape[-1] in (1, 3, 4) else ""
        raise DataSourceError(f"{source}: 'images' is N x C x H x W with C = 1 (grey), 3 (RGB) or 4 (RGBA) channels; "
                              f"got shape {images.shape}{hint}")
    if images.dtype.kind == "f":
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if not finite.all():
            raise DataSourceError(f"{source}: image {int(np.argmin(finite))} has NaN or infinite pixel values "
                                  f"({int((~finite).sum())} images do)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataSourceError(f"{source}: 'labels' must hold one class id per image ({len(images)}; got shape "
                              f"{labels.shape})")
    if labels.dtype.kind not in "biuf":
        raise DataSourceError(f"{source}: 'labels' must be integer class ids (got dtype {labels.dtype})")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataSourceError(f"{source}: label {labels[i]} of image {i} is not an integer class id")
    if labels.min() < 0:
        i = int(np.argmin(labels))
        raise DataSourceError(f"{source}: label {labels[i]} of image {i} is negative; class ids are 0, 1, 2, ...")
    if labels.max() >= max(len(labels), MAX_SPARSE_CLASSES):  # (before the cast: a huge label would wrap)
        raise DataSourceError(f"{source}: largest label {labels.max()} means {int(labels.max()) + 1:,} classes, more "
                              f"than the {len(labels):,} images; labels must be class ids 0..K-1")
    return images, labels.astype(np.int64)


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N")


def _pixels(im, name: str) -> tuple[np.ndarray, bool]:
    """(H x W grey or H x W x 3 colour float32 pixels in [0, 1], whether transparency was
    composited) of one PIL image. Values are scaled by the mode's range, so a 16-bit PNG
    (I;16) keeps its tones instead of clipping to white; transparent pixels (RGBA, LA, a
    palette with transparency) are composited on black, not shown in the colour they hide."""
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode == "F":  # (32-bit float: no range to scale by)
        raise DataSourceError(f"{name}: a 32-bit float image (mode F) has no fixed range; save it as 8 or 16-bit")
    elif im.mode not in _GREY_MODES and im.mode not in ("RGB", "RGBA"):  # CMYK, YCbCr, LAB, ...
        try:
            im = im.convert("RGB")
        except ValueError:
            raise DataSourceError(f"{name}: image mode {im.mode} is not supported; save it as grey or RGB") from None
    if im.mode.startswith("I"):
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise DataSourceError(f"{name}: {im.mode} pixel values from {a.min()} to {a.max()}, outside 16 bits")
        return a.astype(np.float32) / np.float32(65535.0), False
    if im.mode not in ("LA", "RGBA"):
        return np.asarray(im, dtype=np.float32) / np.float32(255.0), False
    a = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    colour, alpha = a[..., :-1], a[..., -1:]
    if alpha.min() == 1.0:  # opaque: the alpha channel says nothing
        return (colour[..., 0] if im.mode != "RGBA" else colour), False
    out = colour * alpha
    return (out[..., 0] if im.mode != "RGBA" else out), True


def _read_class_folders(fs, root: str, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Images in one sub-folder per class. All must be grey or all colour: a mix is refused,
    naming one of each (converting one to the other silently dropped colour or invented it)."""
    from PIL import Image

    classes = sorted(Path(p).name for p in fs.ls(root, detail=False)  # (not .ipynb_checkpoints, __MACOSX)
                     if fs.isdir(p) and not Path(p).name.startswith((".", "__")))
    if not classes:
        raise DataSourceError(f"{source}: expected one sub-folder per class")
    protocol = f"{source.split('://')[0]}://" if "://" in source else ""
    images, labels, names = [], [], []
    first: dict[bool, tuple[str, str]] = {}  # colour? -> (first such file, its mode)
    composited: list[str] = []
    for idx, cls in enumerate(classes):
        folder = f"{root.rstrip('/')}/{cls}"
        files = [f for f in sorted(fs.ls(folder, detail=False))  # not hidden files (macOS's ._0.png copies)
                 if Path(f).suffix.lower() in IMAGE_SUFFIXES and not Path(f).name.startswith(".")]
        if not files:
            raise DataSourceError(f"{protocol}{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found under this "
                                  "class folder")
        for f in files:
            try:
                with fs.open(f, "rb") as fh, Image.open(fh) as im:
                    mode = im.mode
                    img, alpha = _pixels(im, f"{protocol}{f}")
            except DataSourceError:
                raise
            except Image.UnidentifiedImageError:  # its message names fsspec's file object, not the file
                raise DataSourceError(f"{protocol}{f}: not an image PIL can read") from None
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, damaged
                raise DataSourceError(f"{protocol}{f}: not a readable image ({e})") from None
            colour = img.ndim == 3
            first.setdefault(colour, (f"{protocol}{f}", mode))
            if len(first) == 2:
                (c_name, c_mode), (g_name, g_mode) = first[True], first[False]
                raise DataSourceError(f"{c_name}: a colour image ({c_mode}), but {g_name} is greyscale ({g_mode}); the "
                                      "class folders must be all colour or all grey: convert them to one first")
            if alpha:
                composited.append(f"{protocol}{f}")
            images.append(img.transpose(2, 0, 1) if colour else img[None])
            labels.append(idx)
            names.append(f"{protocol}{f}")
    odd = next((i for i, img in enumerate(images) if img.shape != images[0].shape), None)
    if odd is not None:
        raise DataSourceError(f"{names[odd]}: size {images[odd].shape[-2:]} differs from {names[0]}'s "
                              f"{images[0].shape[-2:]}; images differ in size, resize them first")
    if composited:
        print(f"note: {source}: {len(composited)} images with transparent pixels were composited on black (the "
              f"first: {composited[0]})", file=sys.stderr, flush=True)
    return np.stack(images), np.asarray(labels, dtype=np.int64), len(classes)
