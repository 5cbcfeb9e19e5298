"""Image sources and image prepare: values scaled by what the file says (dtype, PNG mode), never
guessed or clipped; splits keyed on pixels alone; empty splits refused at prepare; memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config.schema import AugmentConfig, ImageDataConfig, SplitConfig
from pipeline.data.image_sources import read_images
from pipeline.data.images import prepare_images
from pipeline.data.sources import DataSourceError

NO_AUG = AugmentConfig(copies=0)


def _key(img: np.ndarray) -> bytes:
    """An image of a prepared split ([-1, 1]) as the 8-bit pixels it was hashed by."""
    return np.round((img + 1) / 2 * 255).astype(np.uint8).tobytes()


def _split_of(splits: dict) -> dict[bytes, str]:
    return {_key(img): s for s, (xs, _) in splits.items() for img in xs}


def _class_folder(root: Path, name: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), "L").save(root / name / f"{i:03d}.png")


# ----------------------------------------------------------------------------- splits keyed on pixels
def test_adding_a_class_that_sorts_first_moves_no_old_image(tmp_path):
    """Labels are sorted class-folder indices: a new folder 'ant' renumbers 'cat' and 'dog'. The
    split hash must not see the label, or old images change split (62 of 200 did)."""
    _class_folder(tmp_path, "cat", 40, 0)
    _class_folder(tmp_path, "dog", 40, 1)
    cfg = ImageDataConfig(source=str(tmp_path), augment=NO_AUG)
    before = _split_of(prepare_images(*read_images(str(tmp_path))[:2], cfg, 7)[0])
    _class_folder(tmp_path, "ant", 10, 2)
    x, y, n = read_images(str(tmp_path))
    assert n == 3 and y[:10].tolist() == [0] * 10  # 'ant' took label 0
    after = _split_of(prepare_images(x, y, cfg, 7)[0])
    assert {k: after[k] for k in before} == before


def test_same_pixels_under_other_labels_share_a_split():
    """A mislabelled copy (same pixels, another label) is kept, counted, and in the same split as
    its original, so no held-out image has its exact pixels in train; labels 256 apart are not
    taken for duplicates; a repeat of pixels and label is dropped."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 1, 6, 6)).astype(np.float32) / 255
    y = np.arange(60) % 5
    xx = np.concatenate([x, x, x[:1], x[:1]])
    yy = np.concatenate([y, (y + 1) % 5, [256], y[:1]])  # relabelled copies; label 256; one true repeat
    splits, stats = prepare_images(xx, yy, ImageDataConfig(augment=NO_AUG), 3)
    assert stats["dropped_duplicates"] == 1 and stats["kept_same_pixels_other_label"] == 61
    assert sum(stats[f"images_{s}"] for s in ("train", "val", "test")) == 121
    train = {_key(img) for img in splits["train"][0]}
    held_out = [_key(img) for s in ("val", "test") for img in splits[s][0]]
    assert held_out and not train.intersection(held_out)


def test_empty_split_is_refused_at_prepare_with_the_counts():
    x = np.random.default_rng(0).random((3, 1, 6, 6), dtype=np.float32)
    with pytest.raises(ValueError, match=r"^tasks\.diffusion\.data\.split: the (val|test|val and test) splits? "
                                         r"(is|are) empty \(\d train, \d val, \d test images of 3 read, 0 exact "
                                         r"duplicates dropped\): use more data or larger fractions for") as err:
        prepare_images(x, np.arange(3), ImageDataConfig(augment=NO_AUG), 0)
    assert "\n" not in str(err.value)
    cfg = ImageDataConfig(augment=NO_AUG, split=SplitConfig(train=0.4, val=0.3, test=0.3))
    _, stats = prepare_images(np.concatenate([x] * 4) + np.arange(12)[:, None, None, None] / 100, np.arange(12) % 2,
                              cfg, 0)
    assert min(stats["images_val"], stats["images_test"]) > 0


# ----------------------------------------------------------------------------- .npz value ranges
@pytest.mark.parametrize(("images", "expected"), [
    (np.array([0, 5, 12], np.uint8), [0, 5 / 255, 12 / 255]),  # dark uint8 (max <= 16) is not /16
    (np.array([0, 300, 65535], np.uint16), [0, 300 / 65535, 1]),  # uint16 is not clipped
    (np.array([-1.0, 0.0, 1.0], np.float32), [0, 0.5, 1]),  # already in [-1, 1]: not clipped to [0, 1]
    (np.array([0.0, 0.25, 1.0], np.float64), [0, 0.25, 1]),
], ids=["dark-uint8", "uint16", "float-minus1-1", "float-0-1"])
def test_npz_images_are_scaled_by_dtype(tmp_path, images, expected):
    np.savez(tmp_path / "x.npz", images=np.resize(images, (4, 2, 3)), labels=np.arange(4) % 2)
    x, _, _ = read_images(str(tmp_path / "x.npz"))
    assert x.dtype == np.float32 and x.shape == (4, 1, 2, 3)
    assert np.allclose(x[0, 0, 0], expected, atol=1e-6)


@pytest.mark.parametrize(("images", "expected"), [
    (np.array([0.0, 128.0, 255.0]), r"'images' are float64 from 0 to 255; images are read by dtype"),
    (np.array([0, 7, 255], np.int64), r"'images' are int64 from 0 to 255; images are read by dtype: uint8"),
    (np.array([-2.0, 0.0, 1.0], np.float32), r"'images' are float32 from -2 to 1"),
    (np.array([-0.2, 0.0, 1.0], np.float32), r"'images' are float32 from -0.2 to 1; .*\[0, 1\] \(minimum at least"),
    (np.array([0.0, 0.5, 1.02], np.float32), r"'images' are float32 from 0 to 1.02"),
], ids=["float-0-255", "int64", "float-below-minus1", "float-neither-range", "float-above-1"])
def test_npz_images_of_no_known_range_are_refused(tmp_path, images, expected):
    np.savez(tmp_path / "x.npz", images=np.resize(images, (4, 2, 3)), labels=np.arange(4) % 2)
    with pytest.raises(DataSourceError, match=rf"^{tmp_path}/x\.npz: {expected}"):
        read_images(str(tmp_path / "x.npz"))


def test_npz_float_round_off_is_clipped_not_read_as_minus1_1(tmp_path):
    """A [0, 1] set with one pixel of round-off at -1e-6 (and one at 1 + 1e-4) stays [0, 1],
    clipped: reading it as [-1, 1] squeezed every image into [0.5, 1]. `.NPZ` in upper case is an
    .npz like any other (text sources take suffixes in any case)."""
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 2, 3)).astype(np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -1e-6, 1 + 1e-4
    np.savez(tmp_path / "x.npz", images=x, labels=np.arange(4) % 2)
    (tmp_path / "X.NPZ").write_bytes((tmp_path / "x.npz").read_bytes())
    for name in ("x.npz", "X.NPZ"):
        got, _, _ = read_images(str(tmp_path / name))
        assert got.min() == 0.0 and got.max() == 1.0
        assert np.allclose(got, np.clip(x, 0, 1), atol=1e-7), name


# ----------------------------------------------------------------------------- PNG modes
def test_sixteen_bit_png_keeps_its_tones(tmp_path):
    (tmp_path / "c").mkdir()
    ramp = np.linspace(0, 65535, 36).reshape(6, 6).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "c" / "ramp.png")
    assert Image.open(tmp_path / "c" / "ramp.png").mode.startswith("I")
    x, _, _ = read_images(str(tmp_path))
    assert x.shape == (1, 1, 6, 6) and np.allclose(x[0, 0], ramp / 65535, atol=1e-6)


def test_grey_and_colour_images_mixed_are_refused_naming_one_of_each(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
    Image.new("L", (6, 6), 128).save(tmp_path / "a" / "0_grey.png")
    Image.new("RGB", (6, 6), (255, 0, 0)).save(tmp_path / "a" / "1_red.png")
    Image.new("RGB", (6, 6), (0, 0, 255)).save(tmp_path / "b" / "0_blue.png")
    with pytest.raises(DataSourceError, match=rf"^{tmp_path}/a/1_red\.png: a colour image \(RGB\), but "
                                              rf"{tmp_path}/a/0_grey\.png is greyscale \(L\)"):
        read_images(str(tmp_path))
    (tmp_path / "a" / "0_grey.png").unlink()
    x, _, _ = read_images(str(tmp_path))
    assert x.shape == (2, 3, 6, 6) and x[0, :, 0, 0].tolist() == [1, 0, 0]


def test_transparent_pixels_are_composited_on_black(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    a = np.zeros((6, 6, 4), np.uint8)
    a[..., 1], a[..., 3] = 255, 0  # fully transparent, hidden green
    a[0, 0] = (255, 255, 255, 255)  # one opaque white pixel
    a[0, 1] = (255, 0, 0, 51)  # red at 20 %
    Image.fromarray(a, "RGBA").save(tmp_path / "c" / "0.png")
    Image.fromarray(np.full((6, 6, 4), 200, np.uint8) | np.array([0, 0, 0, 255], np.uint8), "RGBA").save(
        tmp_path / "c" / "1_opaque.png")
    x, _, _ = read_images(str(tmp_path))
    assert x.shape == (2, 3, 6, 6)
    assert x[0, :, 1, 1].tolist() == [0, 0, 0] and x[0, :, 0, 0].tolist() == [1, 1, 1]
    assert np.allclose(x[0, :, 0, 1], [0.2, 0, 0]) and np.allclose(x[1], 200 / 255)
    assert f"1 images with transparent pixels were composited on black (the first: {tmp_path}/c/0.png)" in (
        capsys.readouterr().err)


# ----------------------------------------------------------------------------- memory
def test_prepare_images_holds_few_copies_and_leaves_its_input_alone():
    """3 x 2,000 float32 images of 3 x 16 x 16 (6 MB) with 2 augmented copies: the output alone is
    about 2.6 x the input; prepare must stay near that (it peaked at 10.8x before: repeated
    astype/clip/concatenate/stack/rescale copies; 2.7x now)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2000, 3, 16, 16)).astype(np.float32) / 255
    y = rng.integers(0, 10, 2000)
    original = x.copy()
    cfg = ImageDataConfig(image_size=16, augment=AugmentConfig(copies=2, rotate_deg=0, shift_px=0))
    tracemalloc.start()
    try:
        splits, _ = prepare_images(x, y, cfg, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out = sum(v.nbytes for v, _ in splits.values())
    assert np.array_equal(x, original)
    assert out > 2.3 * x.nbytes and peak < out + 0.5 * x.nbytes, (peak / x.nbytes, out / x.nbytes)
