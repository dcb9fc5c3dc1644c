"""WarmupPolyDecay (knl_train/optim/schedules.py): hand-computed values, the Intel Caffe
AlexNet-BN 32K recipe, serialization and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from knl_train.optim import WarmupPolyDecay


def lr_at(schedule, step):
    value = schedule(step)
    assert value.dtype == tf.float32
    return float(value.numpy())


def lrs(schedule, steps):
    return np.array([lr_at(schedule, s) for s in steps])


# ---- hand-computed values ---------------------------------------------------------------------------
def test_warmup_is_linear_from_warmup_start_lr():
    s = WarmupPolyDecay(peak_lr=1.0, total_steps=110, warmup_steps=10, warmup_start_lr=0.1,
                        end_lr=0.01, power=2.0)
    # lr(k) = 0.1 + 0.9·k/10 for k < 10; peak at the first step after the warmup.
    np.testing.assert_allclose(lrs(s, [0, 1, 5, 9]), [0.1, 0.19, 0.55, 0.91], rtol=1e-6)
    assert lr_at(s, 10) == pytest.approx(1.0, rel=1e-6)
    warm = lrs(s, range(11))
    assert np.all(np.diff(warm) > 0)


def test_decay_after_warmup():
    s = WarmupPolyDecay(peak_lr=1.0, total_steps=110, warmup_steps=10, warmup_start_lr=0.1,
                        end_lr=0.01, power=2.0, decay_over="after_warmup")
    # lr = 0.01 + 0.99·(1 − (k − 10)/100)²
    steps = [10, 35, 60, 85, 100, 109, 110]
    want = [1.0, 0.01 + 0.99 * 0.75 ** 2, 0.01 + 0.99 * 0.5 ** 2, 0.01 + 0.99 * 0.25 ** 2,
            0.01 + 0.99 * 0.1 ** 2, 0.01 + 0.99 * 0.01 ** 2, 0.01]
    np.testing.assert_allclose(lrs(s, steps), want, rtol=1e-6)
    assert want[2] == pytest.approx(0.2575)
    decay = lrs(s, range(10, 111))
    assert np.all(np.diff(decay) < 0)


def test_decay_over_global_step():
    s = WarmupPolyDecay(peak_lr=1.0, total_steps=110, warmup_steps=10, warmup_start_lr=0.1,
                        end_lr=0.01, power=2.0, decay_over="global")
    # Same warmup; then lr = 0.01 + 0.99·(1 − k/110)², so it drops when the warmup ends.
    np.testing.assert_allclose(lrs(s, [0, 5, 9]), [0.1, 0.55, 0.91], rtol=1e-6)
    steps = [10, 55, 99, 110]
    want = [0.01 + 0.99 * (100 / 110) ** 2, 0.01 + 0.99 * 0.25, 0.01 + 0.99 * 0.01, 0.01]
    np.testing.assert_allclose(lrs(s, steps), want, rtol=1e-6)
    assert lr_at(s, 10) == pytest.approx(0.828182, rel=1e-6)


def test_power_one_and_no_warmup():
    s = WarmupPolyDecay(peak_lr=2.0, total_steps=8, power=1.0)
    # No warmup: step 0 is the peak; linear decay to 0 over 8 steps.
    np.testing.assert_allclose(lrs(s, range(10)), [2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25,
                                                   0.0, 0.0], rtol=1e-6, atol=1e-7)
    g = WarmupPolyDecay(peak_lr=2.0, total_steps=8, power=1.0, decay_over="global")
    np.testing.assert_allclose(lrs(g, range(10)), lrs(s, range(10)), rtol=1e-6, atol=1e-7)


# ---- the AlexNet-BN 32K recipe (Intel Caffe) --------------------------------------------------------
STEPS_PER_EPOCH = 40


def alexnet_schedule(decay_over="global"):
    return WarmupPolyDecay(peak_lr=33.0, total_steps=100 * STEPS_PER_EPOCH,
                           warmup_steps=10 * STEPS_PER_EPOCH, power=2.0, decay_over=decay_over)


def test_alexnet_bn_32k_recipe():
    s = alexnet_schedule()
    assert s.total_steps == 4000 and s.warmup_steps == 400
    assert lr_at(s, 0) == 0.0
    assert lr_at(s, 200) == pytest.approx(16.5, rel=1e-6)
    # Last warmup step: 33·399/400, near the peak.
    assert lr_at(s, 399) == pytest.approx(33 * 399 / 400, rel=1e-6)
    assert lr_at(s, 399) > 32.9
    # Right after the warmup the global polynomial is already at epoch 10: 33·(1 − 0.1)².
    assert lr_at(s, 400) == pytest.approx(26.73, rel=1e-6)
    # Epoch 55: 33·0.45²; the end of training: 0.
    assert lr_at(s, 55 * STEPS_PER_EPOCH) == pytest.approx(33 * 0.45 ** 2, rel=1e-6)
    # (float32: 1 − 3999/4000 loses ~4 digits to cancellation)
    assert lr_at(s, 3999) == pytest.approx(33 * (1 / 4000) ** 2, rel=2e-3)
    assert lr_at(s, 4000) == 0.0
    # Decaying over the steps after the warmup instead keeps the peak at step 400.
    assert lr_at(alexnet_schedule("after_warmup"), 400) == pytest.approx(33.0, rel=1e-6)


def test_schedule_with_tensor_step_inside_tf_function():
    s = alexnet_schedule()
    step = tf.Variable(0, dtype=tf.int64)  # like optimizer.iterations

    @tf.function
    def current():
        return s(step)

    got = []
    for k in (0, 399, 400, 4000):
        step.assign(k)
        got.append(float(current().numpy()))
    np.testing.assert_allclose(got, [0.0, 33 * 399 / 400, 26.73, 0.0], rtol=1e-6)


# ---- end of schedule --------------------------------------------------------------------------------
@pytest.mark.parametrize("decay_over", ["after_warmup", "global"])
@pytest.mark.parametrize("warmup_steps", [0, 3, 12, 20])
def test_end_lr_reached_at_total_steps_and_held(decay_over, warmup_steps):
    s = WarmupPolyDecay(peak_lr=0.8, total_steps=20, warmup_steps=warmup_steps,
                        warmup_start_lr=0.05, end_lr=0.003, power=2.0, decay_over=decay_over)
    for k in (20, 21, 35, 10 ** 6):
        assert lr_at(s, k) == pytest.approx(0.003, rel=1e-6), k
    assert lr_at(s, 19) > 0.003


# ---- serialization -----------------------------------------------------------------------------------
def _custom():
    return WarmupPolyDecay(peak_lr=6.4, total_steps=1234, warmup_steps=56, warmup_start_lr=0.2,
                           end_lr=1e-4, power=1.5, decay_over="global", name="my_sched")


def test_get_config_round_trip():
    s = _custom()
    config = s.get_config()
    assert config == {"peak_lr": 6.4, "total_steps": 1234, "warmup_steps": 56,
                      "warmup_start_lr": 0.2, "end_lr": 1e-4, "power": 1.5,
                      "decay_over": "global", "name": "my_sched"}
    rebuilt = WarmupPolyDecay.from_config(config)
    assert type(rebuilt) is WarmupPolyDecay and rebuilt.get_config() == config
    steps = [0, 30, 55, 56, 57, 600, 1233, 1234, 2000]
    np.testing.assert_array_equal(lrs(rebuilt, steps), lrs(s, steps))


def test_keras_serialize_deserialize():
    s = _custom()
    blob = tf.keras.optimizers.schedules.serialize(s)
    assert "WarmupPolyDecay" in blob["class_name"]
    assert blob["config"] == s.get_config()
    rebuilt = tf.keras.optimizers.schedules.deserialize(blob)
    assert isinstance(rebuilt, WarmupPolyDecay)
    assert rebuilt.get_config() == s.get_config()
    steps = [0, 55, 56, 700, 1234]
    np.testing.assert_array_equal(lrs(rebuilt, steps), lrs(s, steps))


# ---- argument checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(total_steps=0),
    dict(total_steps=-10),
    dict(total_steps=10, warmup_steps=11),
    dict(total_steps=10, warmup_steps=-1),
    dict(total_steps=10, decay_over="cosine"),
])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        WarmupPolyDecay(peak_lr=1.0, **kwargs)


def test_boundary_arguments_are_accepted():
    WarmupPolyDecay(peak_lr=1.0, total_steps=1)
    WarmupPolyDecay(peak_lr=1.0, total_steps=10, warmup_steps=10)
    WarmupPolyDecay(peak_lr=1.0, total_steps=10, warmup_steps=0, decay_over="global")
