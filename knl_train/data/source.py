"""One entry point for the trainer: a dataset source chosen by ``data.format``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

from knl_train.data.augment import Augment
from knl_train.data.pipeline import SkipCounter


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
        from knl_train.data import synthetic
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

    if cfg.format == "tfrecord":
        from knl_train.data import tfrecord as reader
        train_split = reader.scan(cfg.path, "train", num_classes=cfg.num_classes,
                                  label_offset=cfg.label_offset, num_examples=cfg.num_examples)
        val_split = reader.scan(cfg.path, "val", num_classes=cfg.num_classes,
                                label_offset=cfg.label_offset)
        extra = dict(shuffle_buffer=cfg.shuffle_buffer)
    else:
        from knl_train.data import folder as reader
        classes = reader.list_classes(cfg.path)
        train_split = reader.scan(cfg.path, "train", classes)
        val_split = reader.scan(cfg.path, "val", classes)
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
