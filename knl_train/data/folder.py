"""ImageNet JPEG folder reader: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*``, sharded per rank.

Class indices come from the sorted wnids of ``train/``, so every rank and every run agrees.
Sharding: each epoch, all ranks shuffle the full file list with the same seed, then rank r
takes every world-th example; the shards are disjoint and together cover the epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import tensorflow as tf

from knl_train.errors import UserError

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png"}
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class FolderSplit:
    files: Tuple[str, ...]
    labels: Tuple[int, ...]
    classes: Tuple[str, ...]

    def __len__(self):
        return len(self.files)


def list_classes(root) -> List[str]:
    train = Path(root) / "train"
    if not Path(root).exists():
        raise UserError(f"dataset path {root} does not exist; "
                        "create one with 'knl-train data make-demo --out DIR' or point data.path at ImageNet")
    if not train.is_dir():
        raise UserError(f"{root} has no train/ directory; expected the ImageNet layout train/<wnid>/*.JPEG")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{train} holds no class directories (train/<wnid>/)")
    return classes


def scan(root, split: str, classes: List[str]) -> FolderSplit:
    """List the images of ``split`` (train or val) under ``root``."""
    base = Path(root) / split
    if not base.is_dir():
        raise UserError(f"{root} has no {split}/ directory")
    files, labels = [], []
    for label, wnid in enumerate(classes):
        d = base / wnid
        if not d.is_dir():
            raise UserError(f"class directory {d} is missing (it exists in train/)")
        names = sorted(n for n in os.listdir(d) if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
        if not names:
            raise UserError(f"class directory {d} holds no images (*.JPEG)")
        files.extend(str(d / n) for n in names)
        labels.extend([label] * len(names))
    return FolderSplit(tuple(files), tuple(labels), tuple(classes))


def _decode(path, image_size):
    img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    img = tf.image.resize(img, [image_size, image_size])
    return img


def _normalize(img):
    return (img - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def train_dataset(split: FolderSplit, *, rank: int, world: int, per_rank_batch: int,
                  image_size: int, seed: int, threads: int = 1) -> tf.data.Dataset:
    """One epoch of this rank's shard per iteration; reshuffled each epoch, identically on all ranks."""
    global_batch = per_rank_batch * world
    steps = len(split) // global_batch
    if steps == 0:
        raise UserError(f"the training set has {len(split)} images, fewer than one global batch "
                        f"of {global_batch}; lower global_batch or add data")
    ds = tf.data.Dataset.from_tensor_slices((list(split.files), list(split.labels)))
    ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.shard(world, rank)

    def load(path, label):
        img = _decode(path, image_size)
        img = tf.image.random_flip_left_right(img)
        return _normalize(img), label

    ds = ds.map(load, num_parallel_calls=threads, deterministic=True)
    ds = ds.batch(per_rank_batch, drop_remainder=True).take(steps)
    return _with_threads(ds.prefetch(2), threads)


def eval_dataset(split: FolderSplit, *, rank: int, world: int, batch: int, image_size: int,
                 threads: int = 1) -> tf.data.Dataset:
    """This rank's share of the evaluation set; every example is evaluated exactly once."""
    ds = tf.data.Dataset.from_tensor_slices((list(split.files), list(split.labels))).shard(world, rank)
    ds = ds.map(lambda p, y: (_normalize(_decode(p, image_size)), y), num_parallel_calls=threads)
    return _with_threads(ds.batch(batch).prefetch(2), threads)


def _with_threads(ds, threads):
    # A private pool keeps decoding off the cores the compute threads are bound to.
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = threads
    opts.threading.max_intra_op_parallelism = 1
    return ds.with_options(opts)
