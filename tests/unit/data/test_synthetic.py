"""Synthetic data (knl_train/data/synthetic.py): shapes, determinism per rank, endless or sized."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from knl_train.data import synthetic
from knl_train.errors import UserError


@pytest.mark.parametrize("mode", ["cached", "random"])
def test_synthetic_shapes_and_determinism(mode):
    ds = synthetic.dataset(per_rank_batch=4, image_size=20, num_classes=7, steps=3, mode=mode, seed=1, rank=1)
    batches = list(ds)
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (4, 20, 20, 3) and x.dtype == tf.float32
        assert y.shape == (4,) and y.dtype == tf.int32 and 0 <= int(tf.reduce_min(y)) <= int(tf.reduce_max(y)) < 7
    again = list(synthetic.dataset(per_rank_batch=4, image_size=20, num_classes=7, steps=3, mode=mode,
                                   seed=1, rank=1))
    np.testing.assert_array_equal(batches[1][0], again[1][0])
    other_rank = next(iter(synthetic.dataset(per_rank_batch=4, image_size=20, num_classes=7, steps=1,
                                             mode=mode, seed=1, rank=0)))
    assert np.abs(other_rank[0].numpy() - batches[0][0].numpy()).max() > 0.1
    if mode == "random":
        assert np.abs(batches[0][0].numpy() - batches[1][0].numpy()).max() > 0.1


def test_synthetic_endless_and_bad_sizes():
    ds = synthetic.dataset(per_rank_batch=2, image_size=8, num_classes=3)
    assert len(list(ds.take(5))) == 5
    with pytest.raises(UserError, match="image_size must be >= 1, got 0"):
        synthetic.dataset(per_rank_batch=2, image_size=0, num_classes=3)
