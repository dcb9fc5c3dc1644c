"""Published LARS test vectors (lars.md §4.1-§4.2): all-ones 3x3 weights and gradients.

Keras keeps the learning rate and momentum hyperparameters in float32 variables, so 0.1 and
0.9 enter even a float64 update as their float32 roundings: the float64 results drift by up to
~3e-8 relative over these steps, so the checks use rtol 1e-7 (the original tf.contrib test used 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from knl_train.optim import LARS

CONTRIB_VAR = [0.99090911845721674, 0.97377931058744671, 0.94973167994784502, 0.91990339373915386,
               0.88540597418577949, 0.84729405916440348, 0.80654338194382147, 0.76403659050772144,
               0.72055553136273276, 0.67677870542481788]
CONTRIB_SLOT = [1.0, 1.9, 2.71, 3.439, 4.0951, 4.68559, 5.217031, 5.6953279, 6.12579511, 6.5132155990]
RTOL = 1e-7
CONTRIB_TRUST = [0.090908815427832051, 0.090156883525105383, 0.088736644426574598]


def _run(opt, steps, dtype=tf.float64, name="w"):
    var = tf.Variable(tf.ones([3, 3], dtype=dtype), name=name)
    grad = tf.ones([3, 3], dtype=dtype)
    out = []
    for _ in range(steps):
        opt.apply_gradients([(grad, var)])
        out.append((var.numpy().copy(), opt.get_slot(var, "momentum").numpy().copy(),
                    float(opt.get_slot(var, "trust_ratio").numpy())))
    return out


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("steps", [1, 10])
def test_tf_contrib_vector(dtype, steps):
    opt = LARS(0.1, momentum=0.9, weight_decay=0.1, epsilon=1e-5, trust_coefficient=0.1,
               variant="tf_contrib")
    for k, (var, slot, trust) in enumerate(_run(opt, steps, dtype)):
        # Tolerance of the original test (assertAllClose defaults).
        np.testing.assert_allclose(var, np.full((3, 3), CONTRIB_VAR[k]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(slot, np.full((3, 3), CONTRIB_SLOT[k]), rtol=1e-6, atol=1e-6)
        if k < len(CONTRIB_TRUST):
            assert trust == pytest.approx(CONTRIB_TRUST[k], rel=1e-6)


def test_tf_contrib_vector_nesterov_and_skipped():
    opt = LARS(0.1, momentum=0.9, weight_decay=0.1, epsilon=1e-5, trust_coefficient=0.1,
               variant="tf_contrib", nesterov=True)
    got = [v[0, 0] for v, _, _ in _run(opt, 3)]
    np.testing.assert_allclose(got, [0.982727325069, 0.958478494253, 0.928399523736], rtol=RTOL)
    # A skipped variable gets t = 1 and (contrib never applies it anyway) no weight decay.
    opt = LARS(0.1, momentum=0.9, weight_decay=0.1, epsilon=1e-5, trust_coefficient=0.1,
               variant="tf_contrib", exclude_from_weight_decay=["skip"],
               exclude_from_layer_adaptation=["skip"])
    run = _run(opt, 3, name="skip_me")
    np.testing.assert_allclose([v[0, 0] for v, _, _ in run], [0.9, 0.71, 0.439], rtol=RTOL)
    np.testing.assert_allclose([s[0, 0] for _, s, _ in run], [1.0, 1.9, 2.71], rtol=RTOL)
    assert [t for _, _, t in run] == [1.0, 1.0, 1.0]


def test_model_garden_vector():
    opt = LARS(0.1, momentum=0.9, weight_decay=0.1, epsilon=0.0, trust_coefficient=0.1,
               variant="model_garden")
    run = _run(opt, 10)
    expected = {0: (0.99, 0.01, 0.090909090909090912), 1: (0.9711, 0.0189, 0.090081892629663346),
                2: (0.944379, 0.026721, 0.088514369570963716),
                9: (0.62107911247060166, 0.054560576568103106, 0.063287981677802682)}
    for k, (var, slot, trust) in expected.items():
        assert run[k][0][0, 0] == pytest.approx(var, rel=RTOL)
        assert run[k][1][0, 0] == pytest.approx(-slot, rel=RTOL)  # Keras momentum keeps -v
        assert run[k][2] == pytest.approx(trust, rel=RTOL)
    nesterov = LARS(0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.1,
                    variant="model_garden", nesterov=True)
    np.testing.assert_allclose([v[0, 0] for v, _, _ in _run(nesterov, 3)],
                               [0.981, 0.954261, 0.920893941], rtol=RTOL)
    # Excluded from both: plain momentum SGD.
    excluded = LARS(0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.1,
                    variant="model_garden", exclude_from_weight_decay=["bias"],
                    exclude_from_layer_adaptation=["bias"])
    run = _run(excluded, 3, name="bias")
    np.testing.assert_allclose([v[0, 0] for v, _, _ in run], [0.9, 0.71, 0.439], rtol=RTOL)
    np.testing.assert_allclose([-s[0, 0] for _, s, _ in run], [0.1, 0.19, 0.271], rtol=RTOL)


def test_you_variant_matches_the_mlperf_tf2_reference():
    """The MLPerf TF2 LARS is the paper's algorithm with eps 1e-5 (lars.md §2.5, §4.2)."""
    opt = LARS(0.1, momentum=0.9, weight_decay=0.1, epsilon=1e-5, trust_coefficient=0.1, variant="you")
    run = _run(opt, 3)
    np.testing.assert_allclose([v[0, 0] for v, _, _ in run],
                               [0.99000003030293848, 0.97110008729976105, 0.94437916722860638],
                               rtol=RTOL)
    np.testing.assert_allclose([s[0, 0] for _, s, _ in run],
                               [-0.0099999697, -0.0188999430, -0.0267209201], rtol=1e-7)
