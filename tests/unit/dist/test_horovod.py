"""Horovod glue that needs no second rank (knl_train/dist/horovod.py): wrapping an optimizer, with
gradient accumulation and compression, keeps every setting and patches nothing."""

from __future__ import annotations

import pytest

from knl_train.dist import horovod as dist
from knl_train.optim import LARS, WarmupPolyDecay
from knl_train.optim.schedules import per_update

pytestmark = pytest.mark.usefixtures("hvd")  # Horovod initialised, one rank


def test_wrapping_with_accumulation_keeps_every_setting():
    inner = WarmupPolyDecay(peak_lr=4.0, total_steps=10, warmup_steps=2)
    momentum = WarmupPolyDecay(peak_lr=0.9, total_steps=10, warmup_steps=0, end_lr=0.9)
    opt = dist.distributed_optimizer(
        LARS(per_update(inner, 2), momentum=per_update(momentum, 2), weight_decay=3e-4,
             variant="tf_contrib", exclude_from_weight_decay=["bias"]),
        backward_passes_per_step=2, compression="fp16")
    cfg = opt.get_config()
    assert cfg["variant"] == "tf_contrib" and cfg["weight_decay"] == 3e-4
    assert cfg["exclude_from_weight_decay"] == ["bias"]
    assert cfg["learning_rate"]["class_name"].endswith("PerUpdateSchedule")
    assert cfg["momentum"]["class_name"].endswith("PerUpdateSchedule")


def test_wrapping_patches_nothing():
    # The schedule is finished before the optimizer is built (train.setup.build_schedule).
    inner = WarmupPolyDecay(peak_lr=4.0, total_steps=10, warmup_steps=2)
    cfg = dist.distributed_optimizer(LARS(inner), backward_passes_per_step=2).get_config()
    assert cfg["learning_rate"]["class_name"].endswith("WarmupPolyDecay")


@pytest.mark.parametrize("kwargs, match", [({"backward_passes_per_step": 0}, "backward_passes"),
                                           ({"compression": "int8"}, "compression")])
def test_bad_wrapping_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dist.distributed_optimizer(LARS(0.1), **kwargs)


def test_the_gradient_allreduce_is_timed_outside_the_checkpoint():
    import numpy as np
    import tensorflow as tf
    from knl_train.optim import SGD
    opt = dist.distributed_optimizer(SGD(0.1))
    waited = dist.allreduce_wait_clock(opt)
    assert waited() == 0.0
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((8, 3), np.float32), np.zeros((8, 2), np.float32), batch_size=4, epochs=1,
              verbose=0)
    assert 0.0 < waited() < 5.0  # two allreduces, one rank: a little, never nothing
    names = tf.train.Checkpoint(model=model, optimizer=opt).save("/dev/shm/knl-h2-ckpt")
    try:
        saved = list(tf.train.load_checkpoint(names).get_variable_to_shape_map())
        assert saved and not [n for n in saved if "wait" in n]
    finally:
        for f in __import__("glob").glob("/dev/shm/knl-h2-ckpt*"):
            __import__("os").unlink(f)
