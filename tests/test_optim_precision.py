"""LARS under mixed bfloat16 and XLA: float32 slots, finite training, same math as eager."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from knl_train.models import build
from knl_train.optim import LARS


@pytest.fixture()
def mixed_bf16():
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


def _batch(n=16, size=16):
    rng = np.random.default_rng(1)
    return rng.normal(size=(n, size, size, 3)).astype("float32"), rng.integers(0, 4, n)


@pytest.mark.parametrize("variant", ["you", "tf_contrib", "model_garden"])
def test_mixed_bfloat16_keeps_float32_variables_and_slots(mixed_bf16, variant):
    tf.keras.utils.set_random_seed(2)
    model = build("small_cnn", num_classes=4, image_size=16)
    opt = LARS(1.0, weight_decay=1e-4, variant=variant)
    model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _batch()
    losses = [float(model.train_on_batch(x, y)) for _ in range(4)]
    assert model.layers[1].compute_dtype == "bfloat16"
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)
    for v in model.trainable_variables:
        assert opt.get_slot(v, "momentum").dtype == tf.float32
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(np.isfinite(list(opt.trust_ratios().values())))


def test_xla_training_step_matches_the_graph_step():
    x, y = _batch()
    results = []
    for jit in (False, True):
        tf.keras.utils.set_random_seed(3)
        model = build("small_cnn", num_classes=4, image_size=16)
        model.compile(optimizer=LARS(1.0, weight_decay=1e-4),
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
        for _ in range(3):
            model.train_on_batch(x, y)
        results.append([v.numpy() for v in model.trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
