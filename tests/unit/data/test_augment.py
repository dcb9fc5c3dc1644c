"""Shared decoding and augmentation (knl_train/data/augment.py): train and eval transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from knl_train.data import augment as aug
from knl_train.errors import UserError


def _encode(pixels, fmt="JPEG"):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["flip", "inception", "none"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_train_transform_shapes_ranges_and_determinism(mode, fmt):
    data = tf.constant(_encode(PIXELS, fmt))
    a = aug.Augment(mode=mode)
    out = aug.train_image(data, tf.constant([1, 2], tf.int64), 32, a).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.float32 and np.isfinite(out).all()
    lo = (0 - np.array(aug.MEAN_RGB)) / np.array(aug.STDDEV_RGB)
    hi = (255 - np.array(aug.MEAN_RGB)) / np.array(aug.STDDEV_RGB)
    assert (out >= lo - 1e-3).all() and (out <= hi + 1e-3).all()
    again = aug.train_image(data, tf.constant([1, 2], tf.int64), 32, a).numpy()
    np.testing.assert_array_equal(out, again)  # stateless: same seed, same image
    if mode == "inception":
        others = [aug.train_image(data, tf.constant([1, k], tf.int64), 32, a).numpy() for k in range(3, 7)]
        assert any(np.abs(o - out).max() > 0.1 for o in others)


def test_crop_scale_defaults_by_image_size():
    assert aug.Augment().scale_for(32) == (0.35, 1.0)
    assert aug.Augment().scale_for(224) == (0.08, 1.0)
    assert aug.Augment(crop_scale=(0.5, 1.0)).scale_for(224) == (0.5, 1.0)


def test_eval_center_crop_is_exact():
    # Shorter side 16 == round(14 / 0.875): no resize, so the crop is an exact slice.
    pixels = RNG.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    out = aug.eval_image(tf.constant(_encode(pixels, "PNG")), 14, aug.Augment(mode="inception")).numpy()
    want = (pixels[1:15, 5:19].astype(np.float32) - np.array(aug.MEAN_RGB)) / np.array(aug.STDDEV_RGB)
    np.testing.assert_allclose(out, want, atol=1e-4)
    # A larger image is first resized so its shorter side is 16, then cropped to 14 x 14.
    big = aug.center_crop(tf.zeros([64, 96, 3]), 14).numpy()
    assert big.shape == (14, 14, 3)


def test_flip_mode_eval_resizes_the_whole_image():
    pixels = RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    out = aug.eval_image(tf.constant(_encode(pixels, "PNG")), 16, aug.Augment()).numpy()
    np.testing.assert_allclose(out, (pixels - np.array(aug.MEAN_RGB)) / np.array(aug.STDDEV_RGB), atol=1e-4)


def _with_thumbnail(jpeg, thumb):
    """``jpeg`` with ``thumb`` (a whole JPEG, SOS and EOI included) inside an APP1 segment after
    the SOI, as cameras store an EXIF thumbnail."""
    body = b"Exif\x00\x00" + thumb
    return jpeg[:2] + b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


def test_looks_valid():
    jpeg, png = _encode(PIXELS), _encode(PIXELS, "PNG")
    cases = {b"": False, jpeg: True, png: True, jpeg[: len(jpeg) // 2]: False,
             b"not an image at all": False, b"\xff\xd8\xff" + b"\x00" * 100: False}
    for data, want in cases.items():
        assert bool(aug.looks_valid(tf.constant(data))) is want, data[:20]


def test_bytes_after_the_end_marker_are_allowed_a_cut_off_jpeg_is_not():
    jpeg, png = _encode(PIXELS), _encode(PIXELS, "PNG")
    progressive = io.BytesIO()
    Image.fromarray(PIXELS).save(progressive, format="JPEG", progressive=True)
    progressive = progressive.getvalue()
    thumbed = _with_thumbnail(jpeg, _encode(PIXELS[:8, :8]))
    trailers = [b"\x00" * 300, b"garbage" * 50, b"\xff\xda\x00\x08" * 20, jpeg]
    for base in (jpeg, progressive, thumbed):
        # PIL reads all of these (the trailer is ignored) ...
        for trailer in trailers:
            Image.open(io.BytesIO(base + trailer)).load()
            assert bool(aug.looks_valid(tf.constant(base + trailer))), trailer[:8]
        # ... and rejects a file cut off in its scan, even one whose thumbnail is whole.
        for cut in (base[: len(base) // 2], base[:-40]):
            with pytest.raises(OSError, match="truncated"):
                Image.open(io.BytesIO(cut)).load()
            assert not bool(aug.looks_valid(tf.constant(cut)))
    assert bool(aug.looks_valid(tf.constant(png + b"trailer" * 10)))
    # Compiled (as the pipelines run it) it agrees.
    check = tf.function(aug.looks_valid)
    assert bool(check(tf.constant(jpeg + b"x" * 100))) and not bool(check(tf.constant(jpeg[:-40])))


@pytest.mark.parametrize("mode", ["flip", "inception", "none"])
def test_a_jpeg_with_trailing_bytes_transforms_as_without_them(mode):
    jpeg = _encode(PIXELS)
    a, seed = aug.Augment(mode=mode), tf.constant([3, 4], tf.int64)
    clean = aug.train_image(tf.constant(jpeg), seed, 32, a).numpy()
    trailed = aug.train_image(tf.constant(jpeg + b"\x00junk" * 64), seed, 32, a).numpy()
    np.testing.assert_array_equal(trailed, clean)
    np.testing.assert_array_equal(aug.eval_image(tf.constant(jpeg + b"junk"), 32, a).numpy(),
                                  aug.eval_image(tf.constant(jpeg), 32, a).numpy())


def test_readable_decodes_what_the_byte_check_lets_through():
    jpeg, png = _encode(PIXELS), _encode(PIXELS, "PNG")
    assert aug.readable(jpeg) and aug.readable(png) and aug.readable(jpeg + b"trailer" * 9)
    # A cut-off PNG passes the byte check (its decoder fails on it, and the pipeline skips it).
    assert bool(aug.looks_valid(tf.constant(png[:-20]))) and not aug.readable(png[:-20])
    # A JPEG header with garbage for a body, and an end marker: looks whole, fails to decode.
    garbage = jpeg[:20] + bytes(range(256)) * 2 + b"\xff\xd9"
    assert not aug.readable(garbage)
    assert not aug.readable(b"") and not aug.readable(jpeg[: len(jpeg) // 2])


@pytest.mark.parametrize("kwargs, needle", [
    ({"mode": "mixup"}, "not one of flip, inception, none"),
    ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
    ({"crop_scale": (0.9, 0.5)}, "crop_scale"),
    ({"crop_ratio": (2.0, 1.0)}, "crop_ratio"),
    ({"crop_fraction": 1.5}, "crop_fraction"),
])
def test_bad_augment_settings(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        aug.Augment(**kwargs)
