"""Image decoding and augmentation shared by the folder and TFRecord readers.

Two policies (``Augment.mode``), each a pair of train and eval transforms that see objects at the
same scale:

* ``"flip"`` (the default; what the 32 px demo trains with): train = resize the whole image to
  ``size`` x ``size`` + random left-right flip; eval = resize the whole image.
* ``"inception"``: train = Inception-style random-resized-crop (a crop covering a random
  fraction ``crop_scale`` of the area with aspect ratio in ``crop_ratio``, resized to ``size``)
  + flip; eval = resize the shorter side to ``size / crop_fraction`` (0.875: 256 for 224),
  then a centred ``size`` x ``size`` crop.

``crop_scale`` defaults to the Inception (0.08, 1.0) for images of 128 px and up, and to
(0.35, 1.0) below: an 8 % crop of a 32 px image is 9 px and no longer shows the object.
``"none"`` is the eval transform of ``"flip"`` used for training too (no randomness).

All randomness is stateless, keyed by a per-example seed pair the pipelines derive from
(seed, rank, position in the stream), so a pipeline is deterministic for a seed whatever its
parallelism. Images leave as float32, normalised with the ImageNet mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import tensorflow as tf

from knl_train.errors import UserError

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
MODES = ("flip", "inception", "none")
SMALL_IMAGE = 128


@dataclass(frozen=True)
class Augment:
    mode: str = "flip"
    crop_scale: Optional[Tuple[float, float]] = None  # None: by image size (see module doc)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    crop_fraction: float = 0.875
    flip: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"augmentation mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                raise UserError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(self.crop_scale)}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise UserError(f"crop_ratio must satisfy 0 < min <= max, got {tuple(self.crop_ratio)}")
        if not 0 < self.crop_fraction <= 1:
            raise UserError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    def scale_for(self, image_size: int) -> Tuple[float, float]:
        if self.crop_scale is not None:
            return tuple(self.crop_scale)
        return (0.08, 1.0) if image_size >= SMALL_IMAGE else (0.35, 1.0)


def resolve(augment) -> Augment:
    """``None`` -> the default; a mode name -> ``Augment(mode)``; an ``Augment`` as is."""
    if augment is None:
        return Augment()
    if isinstance(augment, str):
        return Augment(mode=augment)
    return augment


def normalize(img):
    return (tf.cast(img, tf.float32) - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


# ---- validity ---------------------------------------------------------------------------------------
def looks_valid(data):
    """Cheap byte-level check: a JPEG (SOI, and an EOI after its first scan begins) or a PNG
    (signature). Catches zero-byte, non-image and cut-off JPEG files before decoding.

    Bytes after a JPEG's EOI (camera trailers, an appended preview) are allowed, as PIL and
    libjpeg allow them. The check matters for the fused crop-and-decode of "inception", which
    would read a crop out of the intact top of a cut-off JPEG; a full decode (and any PNG
    decode) fails on a cut-off file by itself, and the pipeline skips what fails to decode.
    """
    n = tf.strings.length(data)
    tail = tf.strings.substr(data, tf.maximum(n - 32, 0), 32)  # only the tail is read, not copied whole
    pieces = tf.strings.bytes_split(tail)
    eoi_at_end = tf.reduce_any(tf.equal(tf.strings.join([pieces[:-1], pieces[1:]]), b"\xff\xd9"))
    is_png = tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n")
    # The common case costs the tail look only; the walk runs for JPEGs that end otherwise.
    jpeg = tf.cond(_is_jpeg(data), lambda: eoi_at_end | _eoi_after_scan(data), lambda: False)
    return (n > 0) & (jpeg | is_png)


def _eoi_after_scan(data):
    """Whether a JPEG has an EOI marker (FF D9) after the start of its first scan.

    The walk follows the length-prefixed header segments from the SOI to the first SOS (FF DA),
    so a thumbnail inside an APP segment (with its own SOS and EOI) is stepped over. Inside the
    entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so an FF D9
    after the scan starts is the image's own end, and a cut-off file has none.
    """
    b = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    n = tf.size(b)

    def at(i):
        return tf.gather(b, tf.clip_by_value(i, 0, n - 1))

    def more(p, sos):
        return (sos < 0) & (p + 3 < n) & tf.equal(at(p), 0xFF)

    def step(p, sos):
        marker = at(p + 1)
        length = at(p + 2) * 256 + at(p + 3)
        nxt = tf.where(tf.equal(marker, 0xFF), p + 1, p + 2 + length)  # 0xFF: a fill byte
        return tf.where(tf.equal(marker, 0xDA), p, nxt), tf.where(tf.equal(marker, 0xDA), p, sos)

    _, sos = tf.while_loop(more, step, (tf.constant(2), tf.constant(-1)))
    rest = b[tf.maximum(sos, 0):]
    found = tf.reduce_any(tf.equal(rest[:-1], 0xFF) & tf.equal(rest[1:], 0xD9))
    return (sos >= 0) & found


def readable(data: bytes) -> bool:
    """Whether the trainer can use the image ``data`` (eagerly, for ``to-tfrecord``): the byte
    check, then a decode (a JPEG at 1/8 scale, which reads all its entropy-coded data: a cut-off
    or corrupt file fails as in a full decode, for a fraction of the work)."""
    t = tf.constant(data)
    if not bool(looks_valid(t)):
        return False
    try:
        if bool(_is_jpeg(t)):
            tf.io.decode_jpeg(t, channels=3, ratio=8)
        else:
            decode(t)
    except tf.errors.OpError:
        return False
    return True


def _is_jpeg(data):
    return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def decode(data):
    """uint8 [h, w, 3] from JPEG or PNG bytes."""
    img = tf.io.decode_image(data, channels=3, expand_animations=False)
    img.set_shape([None, None, 3])
    return img


# ---- transforms -------------------------------------------------------------------------------------
def _crop_window(shape, scale, ratio, seed):
    """(offset_y, offset_x, h, w) of an Inception random-resized-crop of an image of ``shape``."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], size[0], size[1]


def train_image(data, seed, image_size: int, augment: Augment):
    """Training transform of encoded image bytes; ``seed`` is an int32/int64 [2] tensor."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    if augment.mode == "inception":
        scale, ratio = augment.scale_for(image_size), augment.crop_ratio

        def fused():  # JPEG: decode only the crop window
            shape = tf.image.extract_jpeg_shape(data)
            oy, ox, h, w = _crop_window(shape, scale, ratio, seeds[0])
            img = tf.image.decode_and_crop_jpeg(data, tf.stack([oy, ox, h, w]), channels=3)
            img.set_shape([None, None, 3])
            return img

        def generic():
            img = decode(data)
            oy, ox, h, w = _crop_window(tf.shape(img), scale, ratio, seeds[0])
            return img[oy:oy + h, ox:ox + w]

        img = tf.cond(_is_jpeg(data), fused, generic)
        img = tf.image.resize(img, [image_size, image_size])
    else:
        img = tf.image.resize(decode(data), [image_size, image_size])
    if augment.flip and augment.mode != "none":
        img = tf.image.stateless_random_flip_left_right(img, seeds[1])
    return normalize(img)


def eval_image(data, image_size: int, augment: Augment):
    """Evaluation transform (deterministic) of encoded image bytes."""
    img = decode(data)
    if augment.mode == "inception":
        img = center_crop(img, image_size, augment.crop_fraction)
    else:
        img = tf.image.resize(img, [image_size, image_size])
    return normalize(img)


def center_crop(img, image_size: int, crop_fraction: float = 0.875):
    """Resize the shorter side to round(image_size / crop_fraction), then crop the centre."""
    shape = tf.shape(img)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    short = tf.cast(tf.round(image_size / crop_fraction), tf.float32)
    s = short / tf.minimum(h, w)
    nh = tf.cast(tf.round(h * s), tf.int32)
    nw = tf.cast(tf.round(w * s), tf.int32)
    img = tf.image.resize(img, [nh, nw])
    oy, ox = (nh - image_size) // 2, (nw - image_size) // 2
    img = img[oy:oy + image_size, ox:ox + image_size]
    img.set_shape([image_size, image_size, img.shape[-1]])
    return img
