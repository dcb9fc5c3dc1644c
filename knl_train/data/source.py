"""One entry point for the trainer: a dataset source chosen by ``data.format``.

Each file format has a reader module (``folder``, ``tfrecord``) with the functions of
``Reader``; ``synthetic`` makes batches in place and needs none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Tuple

import tensorflow as tf

from knl_train.data import folder, synthetic, tfrecord
from knl_train.data.augment import Augment
from knl_train.data.pipeline import SkipCounter


class Split(Protocol):
    """One split as a reader's ``scan`` found it: its classes, and ``len()`` examples."""

    classes: Tuple[str, ...]

    def __len__(self) -> int: ...


class Reader(Protocol):
    """What ``open_source`` asks of a reader module: this rank's batches of a split."""

    def train_dataset(self, split: Split, *, rank: int, world: int, per_rank_batch: int,
                      image_size: int, seed: int, threads: int = 1, augment=None, skips=None,
                      epoch: int = 0, skip_batches: int = 0,
                      num_batches: Optional[int] = None) -> tf.data.Dataset: ...

    def eval_dataset(self, split: Split, *, rank: int, world: int, batch: int, image_size: int,
                     threads: int = 1, augment=None, skips=None) -> tf.data.Dataset: ...


@dataclass(frozen=True)
class DataSource:
    classes: Tuple[str, ...]
    num_train: int
    num_val: int
    # (rank, world, per_rank_batch, epoch, skip_batches, num_batches) -> this rank's batches
    # number skip_batches .. skip_batches + num_batches - 1 of epoch ``epoch``
    train: Callable
    # (rank, world, batch) -> this rank's share of the evaluation set
    eval: Callable
    skips: SkipCounter


def open_source(cfg, *, seed: int) -> DataSource:
    """``cfg`` is a ``DataConfig``. Validates the data (paths, layout, class count) up front."""
    augment = Augment(mode=cfg.augment, crop_scale=cfg.crop_scale)
    skips = SkipCounter()
    common = dict(image_size=cfg.image_size, threads=cfg.threads, augment=augment, skips=skips)

    if cfg.format == "synthetic":
        classes = tuple(str(i) for i in range(cfg.num_classes or 1000))
        n = cfg.num_examples or 1024

        def train(rank, world, per_rank_batch, epoch, skip_batches, num_batches):
            per_epoch = n // (per_rank_batch * world)
            return synthetic.dataset(per_rank_batch=per_rank_batch, image_size=cfg.image_size,
                                     num_classes=len(classes), steps=num_batches, seed=seed,
                                     rank=rank, threads=cfg.threads,
                                     start=epoch * per_epoch + skip_batches)

        def evaluate(rank, world, batch):
            return synthetic.dataset(per_rank_batch=batch, image_size=cfg.image_size,
                                     num_classes=len(classes), steps=2, seed=seed + 1, rank=rank,
                                     threads=cfg.threads)
        return DataSource(classes, n, 0, train, evaluate, skips)

    reader: Reader
    train_split: Split
    val_split: Split
    if cfg.format == "tfrecord":
        reader = tfrecord
        train_split = tfrecord.scan(cfg.path, "train", num_classes=cfg.num_classes,
                                    label_offset=cfg.label_offset, num_examples=cfg.num_examples)
        val_split = tfrecord.scan(cfg.path, "val", num_classes=cfg.num_classes,
                                  label_offset=cfg.label_offset)
        extra = dict(shuffle_buffer=cfg.shuffle_buffer)
    else:
        reader = folder
        classes = folder.list_classes(cfg.path)
        train_split = folder.scan(cfg.path, "train", classes)
        val_split = folder.scan(cfg.path, "val", classes)
        extra = {}

    def train(rank, world, per_rank_batch, epoch, skip_batches, num_batches):
        return reader.train_dataset(train_split, rank=rank, world=world,
                                    per_rank_batch=per_rank_batch, seed=seed, epoch=epoch,
                                    skip_batches=skip_batches, num_batches=num_batches,
                                    **common, **extra)

    def evaluate(rank, world, batch):
        return reader.eval_dataset(val_split, rank=rank, world=world, batch=batch, **common)

    return DataSource(tuple(train_split.classes), len(train_split), len(val_split), train, evaluate,
                      skips)
