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
from knl_train.data.pipeline import SkipCounter, across_epochs, check_global_batch


class Split(Protocol):
    """One split as a reader's ``scan`` found it: its classes, and ``len()`` examples."""

    classes: Tuple[str, ...]

    def __len__(self) -> int: ...


class Reader(Protocol):
    """What ``open_source`` asks of a reader module: this rank's batches of a split."""

    def train_dataset(self, split: Split, *, rank: int, world: int, per_rank_batch: int,
                      image_size: int, seed: int, threads: int = 1, augment=None, skips=None,
                      epoch=0, skip_batches=0, num_batches=None,
                      inner: bool = False) -> tf.data.Dataset: ...

    def eval_dataset(self, split: Split, *, rank: int, world: int, batch: int, image_size: int,
                     threads: int = 1, augment=None, skips=None,
                     cache: bool = False) -> tf.data.Dataset: ...


@dataclass(frozen=True)
class DataSource:
    classes: Tuple[str, ...]
    num_train: int
    num_val: int
    # (rank, world, per_rank_batch, epoch, skip_batches, num_batches, batches_per_epoch=None)
    # -> this rank's ``num_batches`` batches from batch ``skip_batches`` of epoch ``epoch`` on,
    # running on into the next epochs (each ``batches_per_epoch`` long) as one stream
    train: Callable
    # (rank, world, batch, cache=False) -> this rank's share of the evaluation set
    eval: Callable
    skips: SkipCounter


@dataclass(frozen=True)
class Listing:
    """What a reader's ``scan`` found: the training and validation splits (picklable, so one
    rank lists the dataset and broadcasts it, instead of every rank walking the file system)."""
    train: Split
    val: Split


def list_splits(cfg) -> Optional[Listing]:
    """The splits of ``cfg`` (a ``DataConfig``), checked: paths, layout, class count. None for
    synthetic data, which has no files."""
    if cfg.format == "synthetic":
        return None
    if cfg.format == "tfrecord":
        return Listing(tfrecord.scan(cfg.path, "train", num_classes=cfg.num_classes,
                                     label_offset=cfg.label_offset, num_examples=cfg.num_examples),
                       tfrecord.scan(cfg.path, "val", num_classes=cfg.num_classes,
                                     label_offset=cfg.label_offset))
    classes = folder.list_classes(cfg.path)
    return Listing(folder.scan(cfg.path, "train", classes), folder.scan(cfg.path, "val", classes))


def open_source(cfg, *, seed: int, listing: Optional[Listing] = None) -> DataSource:
    """``cfg`` is a ``DataConfig``; ``listing`` its ``list_splits`` (listed here if not given)."""
    augment = Augment(mode=cfg.augment, crop_scale=cfg.crop_scale)
    skips = SkipCounter()
    common = dict(image_size=cfg.image_size, threads=cfg.threads, augment=augment, skips=skips)

    if cfg.format == "synthetic":
        classes = tuple(str(i) for i in range(cfg.num_classes or 1000))
        n = cfg.num_examples or 1024

        def train(rank, world, per_rank_batch, epoch, skip_batches, num_batches,
                  batches_per_epoch=None):
            per_epoch = check_global_batch(n, per_rank_batch * world)

            def one_epoch(e, skip, count):  # batch b of epoch e is number e * per_epoch + b
                return synthetic.dataset(per_rank_batch=per_rank_batch, image_size=cfg.image_size,
                                         num_classes=len(classes), steps=count, seed=seed,
                                         rank=rank, threads=cfg.threads, start=e * per_epoch + skip)
            return across_epochs(one_epoch, first_epoch=epoch, skip_batches=skip_batches,
                                 batches_per_epoch=batches_per_epoch or per_epoch,
                                 num_batches=num_batches, threads=cfg.threads)

        def evaluate(rank, world, batch, cache=False):
            return synthetic.dataset(per_rank_batch=batch, image_size=cfg.image_size,
                                     num_classes=len(classes), steps=2, seed=seed + 1, rank=rank,
                                     threads=cfg.threads)
        return DataSource(classes, n, 0, train, evaluate, skips)

    listing = listing or list_splits(cfg)
    train_split, val_split = listing.train, listing.val
    reader: Reader = tfrecord if cfg.format == "tfrecord" else folder
    extra = dict(shuffle_buffer=cfg.shuffle_buffer) if cfg.format == "tfrecord" else {}

    def train(rank, world, per_rank_batch, epoch, skip_batches, num_batches, batches_per_epoch=None):
        def one_epoch(e, skip, count):
            return reader.train_dataset(train_split, rank=rank, world=world,
                                        per_rank_batch=per_rank_batch, seed=seed, epoch=e,
                                        skip_batches=skip, num_batches=count, inner=True,
                                        **common, **extra)
        if batches_per_epoch is None:
            batches_per_epoch = check_global_batch(len(train_split), per_rank_batch * world)
        return across_epochs(one_epoch, first_epoch=epoch, skip_batches=skip_batches,
                             batches_per_epoch=batches_per_epoch, num_batches=num_batches,
                             threads=cfg.threads)

    def evaluate(rank, world, batch, cache=False):
        return reader.eval_dataset(val_split, rank=rank, world=world, batch=batch, cache=cache,
                                   **common)

    return DataSource(tuple(train_split.classes), len(train_split), len(val_split), train, evaluate,
                      skips)
