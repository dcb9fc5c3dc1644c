"""Synthetic input: random images and labels generated in place, for throughput studies without I/O.

``mode="cached"`` makes one random batch once and repeats it (zero input cost per step: the
pure compute ceiling); ``mode="random"`` draws every batch afresh inside the pipeline
(stateless, so deterministic for (seed, rank)), which costs one RNG pass per step.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from knl_train.data.pipeline import plain, stream_seed, with_threads
from knl_train.errors import UserError
from knl_train.yamlconfig import number, one_of

MODES = ("cached", "random")


def dataset(*, per_rank_batch: int, image_size: int, num_classes: int, steps: Optional[int] = None,
            seed: int = 0, rank: int = 0, channels: int = 3, mode: str = "cached",
            threads: int = 1, start: int = 0) -> tf.data.Dataset:
    """(float32 [per_rank_batch, image_size, image_size, channels], int32 [per_rank_batch]) batches,
    ``steps`` of them (None: endless), from batch number ``start`` of the stream. Images are
    ~N(0, 1), like normalised pixels."""
    try:
        for name, v in (("per_rank_batch", per_rank_batch), ("image_size", image_size),
                        ("num_classes", num_classes), ("channels", channels)):
            number(name, v, minimum=1, integer=True)
        one_of("mode", mode, MODES)
    except ValueError as e:
        raise UserError(f"synthetic data: {e}") from None
    shape = [per_rank_batch, image_size, image_size, channels]

    def make(i):
        s = tf.stack([tf.constant(stream_seed(seed, rank), tf.int64), tf.cast(i, tf.int64)])
        s2 = tf.random.experimental.stateless_split(s, 2)
        x = tf.random.stateless_normal(shape, seed=s2[0])
        y = tf.random.stateless_uniform([per_rank_batch], seed=s2[1], minval=0, maxval=num_classes,
                                        dtype=tf.int32)
        return x, y

    count = -1 if steps is None else steps
    if mode == "cached":
        ds = tf.data.Dataset.from_tensors(make(0)).repeat(count)
    else:
        ds = tf.data.Dataset.range(start, start + count if steps is not None else 2 ** 62).map(
            plain(make), num_parallel_calls=threads, deterministic=True)
    return with_threads(ds.prefetch(1), threads)
