"""Schedules in knl_train/optim/schedules.py: WarmupPolyDecay (hand-computed values, the Intel
Caffe AlexNet-BN 32K recipe), WarmupStepDecay (Goyal), WarmupCosineDecay, the momentum correction
WarmupMomentumCorrection, the builders, per_update under gradient accumulation; serialization,
tf.function use and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from knl_train.optim import WarmupPolyDecay
from knl_train.optim.schedules import (PerUpdateSchedule, WarmupCosineDecay,
                                       WarmupMomentumCorrection, WarmupStepDecay, build_lr_schedule,
                                       build_momentum, per_update)


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


# ==== WarmupStepDecay (Goyal et al. 2017) ============================================================
def goyal(**kw):
    # 10 steps per epoch; 5-epoch warmup from the small-batch LR 0.1 to 3.2 (= 0.1 x 8192/256).
    args = dict(peak_lr=3.2, steps_per_epoch=10, warmup_epochs=5, warmup_start_lr=0.1)
    args.update(kw)
    return WarmupStepDecay(**args)


def test_step_decay_goyal_warmup_and_boundaries():
    s = goyal()
    assert s.warmup_steps == 50 and s.boundary_steps == [300, 600, 800]
    # Warmup: 0.1 + 3.1·k/50, the peak at step 50.
    np.testing.assert_allclose(lrs(s, [0, 25, 49, 50]), [0.1, 1.65, 3.138, 3.2], rtol=1e-6)
    # ×0.1 from the first step of epochs 30, 60 and 80 (step = epoch·10) on.
    steps = [299, 300, 599, 600, 799, 800, 899, 10 ** 6]
    want = [3.2, 0.32, 0.32, 0.032, 0.032, 0.0032, 0.0032, 0.0032]
    np.testing.assert_allclose(lrs(s, steps), want, rtol=1e-6)
    # Keras' PiecewiseConstantDecay switches one step later (step > boundary).
    keras = tf.keras.optimizers.schedules.PiecewiseConstantDecay([300], [3.2, 0.32])
    assert float(keras(300)) == pytest.approx(3.2) and lr_at(s, 300) == pytest.approx(0.32)


def test_step_decay_fractional_boundaries_no_warmup():
    s = WarmupStepDecay(peak_lr=1.0, steps_per_epoch=4, boundary_epochs=[1.5, 3], factor=0.5)
    assert s.warmup_steps == 0 and s.boundary_steps == [6, 12]
    np.testing.assert_allclose(lrs(s, [0, 5, 6, 11, 12, 100]), [1, 1, 0.5, 0.5, 0.25, 0.25],
                               rtol=1e-7)
    flat = WarmupStepDecay(peak_lr=2.0, steps_per_epoch=4, boundary_epochs=[], warmup_epochs=1)
    np.testing.assert_allclose(lrs(flat, [0, 2, 4, 1000]), [0.0, 1.0, 2.0, 2.0], rtol=1e-7)


# ==== WarmupCosineDecay ==================================================================================
def test_cosine_warmup_midpoint_and_end():
    s = WarmupCosineDecay(peak_lr=1.0, total_steps=110, warmup_steps=10, warmup_start_lr=0.1,
                          end_lr=0.01)
    np.testing.assert_allclose(lrs(s, [0, 5, 9]), [0.1, 0.55, 0.91], rtol=1e-6)
    c = np.cos(np.pi / 4)
    # lr = 0.01 + 0.99·(1 + cos(π·(k − 10)/100))/2: peak, quarter, midpoint, three quarters, end.
    steps = [10, 35, 60, 85, 110, 1000]
    want = [1.0, 0.01 + 0.99 * (1 + c) / 2, 0.505, 0.01 + 0.99 * (1 - c) / 2, 0.01, 0.01]
    np.testing.assert_allclose(lrs(s, steps), want, rtol=1e-6)
    assert np.all(np.diff(lrs(s, range(10, 111))) < 0)


def test_cosine_without_warmup_or_decay_phase():
    s = WarmupCosineDecay(peak_lr=2.0, total_steps=4)
    np.testing.assert_allclose(lrs(s, [0, 1, 2, 3, 4]), [2.0, 2 * (1 + np.cos(np.pi / 4)) / 2, 1.0,
                                                         2 * (1 - np.cos(np.pi / 4)) / 2, 0.0],
                               rtol=1e-6, atol=1e-7)
    w = WarmupCosineDecay(peak_lr=1.0, total_steps=4, warmup_steps=4, end_lr=0.5)
    np.testing.assert_allclose(lrs(w, [0, 2, 3, 4, 9]), [0.0, 0.5, 0.75, 0.5, 0.5], rtol=1e-6)


# ==== WarmupMomentumCorrection ============================================================================
def test_momentum_correction_intel_caffe_32k():
    lr = alexnet_schedule_from(1.0, peak=33.0)  # Intel Caffe 32 nodes: 1 -> 33 over 400 iterations
    m = WarmupMomentumCorrection(lr, momentum=0.9)
    assert m.warmup_steps == 400  # taken from the LR schedule
    lr_of = lambda t: 1.0 + 0.08 * t  # (t·33 + (400 − t)·1)/400
    got = lrs(m, [0, 1, 2, 200, 399])
    want = [0.9, 0.9 * lr_of(1) / lr_of(0), 0.9 * lr_of(2) / lr_of(1), 0.9 * 17 / 16.92,
            0.9 * 32.92 / 32.84]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] == pytest.approx(0.972, rel=1e-6)
    # From the first step after the warmup on, exactly m, though the LR drops 32.92 -> 26.73 there.
    assert lr_at(lr, 400) == pytest.approx(26.73, rel=1e-6)
    for t in (400, 401, 2000, 4000, 10 ** 6):
        assert lr_at(m, t) == np.float32(0.9), t


def alexnet_schedule_from(start, peak):
    return WarmupPolyDecay(peak_lr=peak, total_steps=100 * STEPS_PER_EPOCH,
                           warmup_steps=10 * STEPS_PER_EPOCH, warmup_start_lr=start, power=2.0,
                           decay_over="global")


def test_momentum_correction_warmup_from_zero_is_finite():
    lr = WarmupPolyDecay(peak_lr=1.0, total_steps=100, warmup_steps=10)  # lr(t) = t/10
    m = WarmupMomentumCorrection(lr, momentum=0.9)
    got = lrs(m, [0, 1, 2, 3, 9, 10, 11])
    # t=0: no history; t=1: lr(0) = 0, so m; then m·t/(t−1), not clipped; m again from step 10.
    np.testing.assert_allclose(got, [0.9, 0.9, 1.8, 1.35, 0.9 * 9 / 8, 0.9, 0.9], rtol=1e-6)
    assert np.all(np.isfinite(got))
    # Goyal's own case, over a step schedule: 0.1 -> 3.2 in 50 steps, m_1 = 0.9·0.162/0.1.
    g = WarmupMomentumCorrection(goyal(), momentum=0.9)
    assert g.warmup_steps == 50
    np.testing.assert_allclose(lrs(g, [1, 49, 50, 300]), [1.458, 0.9 * 3.138 / 3.076, 0.9, 0.9],
                               rtol=1e-6)


def test_momentum_correction_without_warmup_and_explicit_warmup_steps():
    lr = WarmupPolyDecay(peak_lr=1.0, total_steps=100, power=1.0)
    np.testing.assert_array_equal(lrs(WarmupMomentumCorrection(lr, 0.8), [0, 1, 50, 99]),
                                  np.float32([0.8] * 4))
    # An explicit warmup_steps corrects over any LR schedule, here a decaying one: m·lr(t)/lr(t−1).
    m = WarmupMomentumCorrection(lr, 0.8, warmup_steps=3)
    np.testing.assert_allclose(lrs(m, [1, 2, 3]), [0.8 * 0.99, 0.8 * 0.98 / 0.99, 0.8], rtol=1e-6)


def simulate(momenta, lrs_, grads):
    """LR inside the buffer (v = m_t·v + lr_t·g) and outside it (u = m·u + g; step lr_t·u)."""
    v = np.zeros_like(grads[0])
    steps = []
    for m_t, lr_t, g in zip(momenta, lrs_, grads):
        v = m_t * v + lr_t * g
        steps.append(v)
    return np.array(steps)


def test_momentum_correction_reproduces_lr_outside_momentum_during_warmup():
    lr = WarmupPolyDecay(peak_lr=8.0, total_steps=60, warmup_steps=20, warmup_start_lr=0.5,
                         decay_over="global")
    m = WarmupMomentumCorrection(lr, momentum=0.9)
    t = np.arange(30)
    lr_t, m_t = lrs(lr, t).astype(np.float64), lrs(m, t).astype(np.float64)
    grads = np.random.default_rng(0).normal(size=(30, 5))
    inside = simulate(m_t, lr_t, grads)
    u = simulate(np.full(30, 0.9), np.ones(30), grads)
    outside = lr_t[:, None] * u
    # Goyal: with the correction the LR-inside step equals the LR-outside step while warming up.
    np.testing.assert_allclose(inside[:20], outside[:20], rtol=1e-5)
    # Without it, it does not; nor after the warmup (the global-step drop at step 20).
    plain = simulate(np.full(30, 0.9), lr_t, grads)
    assert np.abs(plain[1:20] - outside[1:20]).max() > 0.1
    assert np.abs(inside[20:] - outside[20:]).max() > 0.1


def test_lars_with_momentum_correction_matches_lr_outside_lars():
    """End to end through the optimizer: LARS evaluates the LR and the momentum at the same step."""
    from knl_train.optim import LARS

    lr = WarmupPolyDecay(peak_lr=1.0, total_steps=20, warmup_steps=8, warmup_start_lr=0.1,
                         decay_over="global")

    def run(variant, momentum):
        w = tf.Variable([[1.0, -2.0], [0.5, 3.0]], name="w")
        # Plain momentum SGD: no weight decay, no trust ratio ("w" excluded from adaptation).
        opt = LARS(learning_rate=lr, momentum=momentum, weight_decay=0.0, variant=variant,
                   exclude_from_layer_adaptation=["w"])
        out = []
        for t in range(10):
            opt.apply_gradients([(tf.constant([[0.3, -0.1], [0.2 * (t + 1), 0.05]]), w)])
            out.append(w.numpy().copy())
        return np.array(out)

    corrected = run("you", WarmupMomentumCorrection(lr, momentum=0.9))  # LR inside the buffer
    outside = run("tf_contrib", 0.9)  # TF ApplyMomentum: LR outside the buffer
    uncorrected = run("you", 0.9)
    np.testing.assert_allclose(corrected[:8], outside[:8], rtol=1e-5, atol=1e-6)
    assert np.abs(uncorrected[1:8] - outside[1:8]).max() > 0.01
    assert np.abs(corrected[8:] - outside[8:]).max() > 0.1  # the LR drop at step 8


# ==== all schedules: tensors, tf.function, serialization ==================================================
def _all_schedules():
    poly = WarmupPolyDecay(peak_lr=6.4, total_steps=300, warmup_steps=30, warmup_start_lr=0.2,
                           end_lr=1e-4, decay_over="global", name="p")
    return [
        poly,
        WarmupStepDecay(peak_lr=3.2, steps_per_epoch=3, boundary_epochs=[30, 60, 80], factor=0.1,
                        warmup_epochs=5, warmup_start_lr=0.1, name="goyal"),
        WarmupCosineDecay(peak_lr=2.0, total_steps=300, warmup_steps=25, warmup_start_lr=0.05,
                          end_lr=0.001, name="cos"),
        WarmupMomentumCorrection(poly, momentum=0.875, name="mc"),
    ]


STEPS = [0, 1, 14, 15, 24, 25, 29, 30, 31, 89, 90, 150, 180, 240, 299, 300, 301, 5000]


@pytest.mark.parametrize("schedule", _all_schedules(), ids=lambda s: type(s).__name__)
def test_tensor_of_steps_and_tf_function(schedule):
    scalar = lrs(schedule, STEPS)
    vector = schedule(tf.constant(STEPS, tf.int64))
    assert vector.dtype == tf.float32 and vector.shape == (len(STEPS),)
    np.testing.assert_allclose(vector.numpy(), scalar, rtol=1e-6)  # vectorized cos: 1 ulp
    step = tf.Variable(0, dtype=tf.int64)
    fn = tf.function(lambda: schedule(step))
    got = []
    for k in STEPS:
        step.assign(k)
        got.append(float(fn().numpy()))
    np.testing.assert_allclose(got, scalar, rtol=1e-6)
    assert fn.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(lrs(schedule, [float(k) for k in STEPS[:6]]), scalar[:6], rtol=1e-6)


@pytest.mark.parametrize("schedule", _all_schedules(), ids=lambda s: type(s).__name__)
def test_every_schedule_round_trips(schedule):
    config = schedule.get_config()
    rebuilt = type(schedule).from_config(config)
    assert type(rebuilt) is type(schedule) and rebuilt.get_config() == config
    blob = tf.keras.optimizers.schedules.serialize(schedule)
    assert blob["registered_name"] == f"knl_train>{type(schedule).__name__}"
    again = tf.keras.optimizers.schedules.deserialize(blob)
    assert type(again) is type(schedule) and again.get_config() == config
    np.testing.assert_array_equal(lrs(again, STEPS), lrs(schedule, STEPS))
    np.testing.assert_array_equal(lrs(rebuilt, STEPS), lrs(schedule, STEPS))


def test_complete_configs():
    step, cos, mc = _all_schedules()[1:]
    assert step.get_config() == {"peak_lr": 3.2, "steps_per_epoch": 3,
                                 "boundary_epochs": [30.0, 60.0, 80.0], "factor": 0.1,
                                 "warmup_epochs": 5.0, "warmup_start_lr": 0.1, "name": "goyal"}
    assert cos.get_config() == {"peak_lr": 2.0, "total_steps": 300, "warmup_steps": 25,
                                "warmup_start_lr": 0.05, "end_lr": 0.001, "name": "cos"}
    config = mc.get_config()
    assert set(config) == {"lr_schedule", "momentum", "warmup_steps", "name"}
    assert config["momentum"] == 0.875 and config["warmup_steps"] == 30
    assert config["lr_schedule"]["config"] == _all_schedules()[0].get_config()


def test_lars_config_keeps_the_momentum_schedule():
    """Horovod's DistributedOptimizer rebuilds LARS with from_config(get_config())."""
    from knl_train.optim import LARS

    poly = _all_schedules()[0]
    opt = LARS(learning_rate=poly, momentum=WarmupMomentumCorrection(poly, momentum=0.9))
    rebuilt = LARS.from_config(opt.get_config())
    sched = rebuilt._momentum_schedule
    assert isinstance(sched, WarmupMomentumCorrection)
    np.testing.assert_array_equal(lrs(sched, STEPS), lrs(opt._momentum_schedule, STEPS))


# ==== builders =============================================================================================
def test_build_lr_schedule_kinds():
    poly = build_lr_schedule("poly", steps_per_epoch=40, epochs=100, peak_lr=33.0,
                             warmup_epochs=10, warmup_start_lr=1.0, decay_over="global")
    assert isinstance(poly, WarmupPolyDecay)
    assert (poly.total_steps, poly.warmup_steps, poly.power) == (4000, 400, 2.0)
    assert lr_at(poly, 400) == pytest.approx(26.73, rel=1e-6)
    step = build_lr_schedule("step", steps_per_epoch=10, epochs=90, peak_lr=3.2, warmup_epochs=5,
                             warmup_start_lr=0.1, boundary_epochs=(30, 60, 80), decay_factor=0.1)
    assert isinstance(step, WarmupStepDecay) and step.boundary_steps == [300, 600, 800]
    assert lr_at(step, 600) == pytest.approx(0.032, rel=1e-6)
    cos = build_lr_schedule("cosine", steps_per_epoch=10, epochs=11, peak_lr=1.0, warmup_epochs=1,
                            warmup_start_lr=0.1, end_lr=0.01)
    assert isinstance(cos, WarmupCosineDecay) and (cos.total_steps, cos.warmup_steps) == (110, 10)
    assert lr_at(cos, 60) == pytest.approx(0.505, rel=1e-6)
    # A warmup longer than the run is cut to the run (the trainer's convention).
    short = build_lr_schedule("poly", steps_per_epoch=10, epochs=2, peak_lr=1.0, warmup_epochs=5)
    assert short.warmup_steps == short.total_steps == 20
    with pytest.raises(ValueError, match="poly, step, cosine"):
        build_lr_schedule("linear", steps_per_epoch=10, epochs=2, peak_lr=1.0)


def test_build_momentum():
    lr = alexnet_schedule_from(1.0, peak=33.0)
    assert build_momentum(0.9, lr, correction=False) == 0.9
    m = build_momentum(0.9, lr, correction=True)
    assert isinstance(m, WarmupMomentumCorrection) and m.warmup_steps == 400
    assert lr_at(m, 1) == pytest.approx(0.972, rel=1e-6)


# ==== argument checks of the new classes (ValueError naming the argument) =================================
@pytest.mark.parametrize("kwargs, arg", [
    (dict(peak_lr=0.0), "peak_lr"),
    (dict(peak_lr=float("nan")), "peak_lr"),
    (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(steps_per_epoch=2.5), "steps_per_epoch"),
    (dict(boundary_epochs=[60, 30]), "boundary_epochs"),
    (dict(boundary_epochs=[30, 30]), "boundary_epochs"),
    (dict(boundary_epochs=[0, 30]), r"boundary_epochs\[0\]"),
    (dict(boundary_epochs="30,60"), "boundary_epochs"),
    (dict(factor=0.0), "factor"),
    (dict(factor=2.0), "factor"),
    (dict(warmup_epochs=-1), "warmup_epochs"),
    (dict(warmup_epochs=31), "warmup_epochs"),
    (dict(warmup_start_lr=-0.1), "warmup_start_lr"),
])
def test_step_decay_invalid_arguments(kwargs, arg):
    args = dict(peak_lr=1.0, steps_per_epoch=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        WarmupStepDecay(**args)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(peak_lr=-1.0), "peak_lr"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=True), "total_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=11), "warmup_steps"),
    (dict(end_lr=-1e-3), "end_lr"),
    (dict(warmup_start_lr=float("inf")), "warmup_start_lr"),
])
def test_cosine_invalid_arguments(kwargs, arg):
    args = dict(peak_lr=1.0, total_steps=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        WarmupCosineDecay(**args)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(lr_schedule=0.1), "lr_schedule"),
    (dict(lr_schedule=lambda step: 0.1), "lr_schedule"),
    (dict(momentum=-0.1), "momentum"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum="0.9"), "momentum"),
    (dict(warmup_steps=-5), "warmup_steps"),
    (dict(lr_schedule=tf.keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)),
     "warmup_steps"),
])
def test_momentum_correction_invalid_arguments(kwargs, arg):
    args = dict(lr_schedule=WarmupPolyDecay(peak_lr=1.0, total_steps=10, warmup_steps=2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        WarmupMomentumCorrection(**args)


# ==== per_update: the LR of gradient accumulation counts updates ======================================
def test_per_update_schedule_counts_updates_not_micro_batches():
    inner = WarmupPolyDecay(peak_lr=4.0, total_steps=10, warmup_steps=2)
    sched = per_update(inner, 3)
    # Update n is applied at micro-batch 3n + 2.
    for n in range(10):
        assert float(sched(3 * n + 2)) == pytest.approx(float(inner(n)))
    again = PerUpdateSchedule.from_config(sched.get_config())
    assert float(again(8)) == pytest.approx(float(inner(2)))
    restored = tf.keras.optimizers.schedules.deserialize(tf.keras.optimizers.schedules.serialize(sched))
    assert isinstance(restored, PerUpdateSchedule) and restored.passes == 3
    # Without accumulation, and for a constant, there is nothing to wrap.
    assert per_update(inner, 1) is inner and per_update(0.9, 3) == 0.9
    with pytest.raises(ValueError, match="passes"):
        per_update(inner, 0)
