"""ImageNet JPEG folder reader: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*``, sharded per rank.

Class indices come from the sorted wnids of ``train/``, so every rank and every run agrees.
Sharding: each epoch, all ranks permute the full file list with the same (seed, epoch), then
rank r takes every world-th example; the shards are disjoint and together cover the epoch.
Corrupt, truncated or empty image files are skipped and counted (``pipeline.SkipCounter``); a
training stream in which nothing can be read (every image bad, the directory gone) stops with an
error after ``pipeline.GIVE_UP`` bad images in a row.

The module is a ``source.Reader`` (``train_dataset``, ``eval_dataset``) of ``FolderSplit``s.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from knl_train.data.augment import MEAN_RGB, STDDEV_RGB  # noqa: F401  (public, used by tests)
from knl_train.data.pipeline import SkipCounter, eval_batches, train_batches
from knl_train.errors import UserError

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png"}


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


def train_dataset(split: FolderSplit, *, rank: int, world: int, per_rank_batch: int,
                  image_size: int, seed: int, threads: int = 1, augment=None,
                  skips: Optional[SkipCounter] = None, epoch=0, skip_batches=0,
                  num_batches=None, inner: bool = False) -> tf.data.Dataset:
    """This rank's batches of epoch ``epoch``, from batch ``skip_batches`` on.

    The epoch's order is a pure function of (seed, epoch), the same on every rank and in every
    run, so a resumed run picks up exactly where the checkpoint left off; skipped batches cost
    no decoding. ``num_batches`` defaults to the rest of the epoch (``len(split) //
    global_batch`` in all). Bad images are skipped and counted in ``skips``; the stream then
    runs on into a fixed fallback order, so a rank never runs short of batches (which would
    stall the allreduce), and gives up with a tagged error if nothing in it is usable. ``augment``: an ``augment.Augment``, a mode name ("flip",
    "inception", "none") or None (flip). ``epoch``, ``skip_batches`` and ``num_batches`` may
    be tensors (``inner``: one epoch of ``pipeline.across_epochs``).
    """
    files = tf.constant(np.asarray(split.files))
    labels = tf.constant(np.asarray(split.labels, np.int32))
    order = tf.numpy_function(functools.partial(_epoch_order, len(split), seed, rank, world),
                              [tf.cast(epoch, tf.int64)], tf.int64, stateful=False)
    order = tf.reshape(order, [-1])[tf.cast(skip_batches, tf.int64) * per_rank_batch:]
    ds = tf.data.Dataset.from_tensor_slices((tf.gather(files, order), tf.gather(labels, order)))
    fallback = np.random.default_rng([seed, 1 << 30]).permutation(len(split))[rank::world]
    ds = ds.concatenate(tf.data.Dataset.from_tensor_slices(
        (tf.gather(files, fallback), tf.gather(labels, fallback))).repeat())
    return train_batches(ds, _load, name=_name, where=_train_dir(split), size=len(split),
                         rank=rank, world=world, per_rank_batch=per_rank_batch,
                         image_size=image_size, seed=seed, threads=threads, augment=augment,
                         skips=skips, epoch=epoch, skip_batches=skip_batches,
                         num_batches=num_batches, inner=inner)


def _epoch_order(n: int, seed: int, rank: int, world: int, epoch) -> np.ndarray:
    """This rank's share of epoch ``epoch``'s permutation of the ``n`` examples."""
    return np.random.default_rng([seed, int(epoch)]).permutation(n)[rank::world].astype(np.int64)


def eval_dataset(split: FolderSplit, *, rank: int, world: int, batch: int, image_size: int,
                 threads: int = 1, augment=None, skips: Optional[SkipCounter] = None,
                 cache: bool = False) -> tf.data.Dataset:
    """This rank's share of the evaluation set; every (readable) example is evaluated exactly
    once. ``cache``: decoded once, then held in memory."""
    ds = tf.data.Dataset.from_tensor_slices((list(split.files), list(split.labels))).shard(world, rank)
    return eval_batches(ds, _load, name=_name, batch=batch, image_size=image_size,
                        threads=threads, augment=augment, skips=skips, cache=cache)


def _load(elem):
    path, label = elem
    return tf.io.read_file(path), tf.cast(label, tf.int32), tf.constant("")


def _name(elem):
    return elem[0]


def _train_dir(split: FolderSplit) -> str:
    """The directory holding the split's class directories (named when nothing in it is usable)."""
    return str(Path(split.files[0]).parent.parent) if split.files else ""
