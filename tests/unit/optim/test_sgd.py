"""Momentum SGD with weight decay (knl_train/optim/sgd.py): Keras's SGD exactly when λ = 0, a
float64 numpy reference of Goyal et al.'s formulas otherwise, the LARS exclusion rules (BN γ/β
and biases), sparse gradients, config round trip, Horovod wrapping and the registry's ``sgd``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tensorflow as tf

from knl_train.optim import LARS, SGD, WarmupPolyDecay, registry
from knl_train.optim.exclusion import RANK_LE_1
from knl_train.optim.schedules import WarmupMomentumCorrection
from knl_train.train import config as train_config
from knl_train.train.config import OptimizerConfig
from tests.support.optim_cases import STEPS, make_data, make_vars, run_optimizer, run_traced

# λ·w is a good fraction of g, so a missing or doubled decay shows at 1e-12. The learning rate
# and momentum are Keras hyper-parameters, held in float32 variables whatever the model dtype,
# so they are exactly representable in float32 here.
HP = dict(learning_rate=0.75, momentum=0.875, weight_decay=0.05)

# name -> (SGD kwargs, {var: decays?}), written out by hand, not derived from ExclusionRule.
EXCLUSIONS = {
    "default": (dict(), {"kernel": True, "bias": False}),
    "none": (dict(exclude_from_weight_decay=[]), {"kernel": True, "bias": True}),
    # A regex alone replaces the default: the bias decays, the kernel does not.
    "regex": (dict(exclude_from_weight_decay=["kern"]), {"kernel": False, "bias": True}),
}


def lr_schedule():
    """A learning rate that changes every step: LR inside or outside momentum then differ."""
    return WarmupPolyDecay(peak_lr=1.2, total_steps=6, warmup_steps=2, warmup_start_lr=0.1,
                           end_lr=0.05, power=2.0)


def step_lrs(schedule, steps=STEPS):
    """The learning rate of each step as the optimizer sees it (a float32 schedule value)."""
    return [float(schedule(k).numpy()) for k in range(steps)]


def reference(w0, grads, *, lrs, momentum, weight_decay, nesterov, decays):
    """Float64 Goyal eq. 10 with the L2 term in the gradient: v ← m·v + η·(g + λw); w ← w − v
    (nesterov: w ← w − (m·v + η·(g + λw))). ``momentum`` is a number or one value per step.
    Returns (w, v)."""
    w = np.array(w0, dtype=np.float64)
    v = np.zeros_like(w)
    lam = weight_decay if decays else 0.0
    ms = momentum if isinstance(momentum, list) else [momentum] * len(grads)
    for g, lr, m in zip(grads, lrs, ms):
        d = np.asarray(g, np.float64) + lam * w
        v = m * v + lr * d
        w = w - (m * v + lr * d) if nesterov else w - v
    return w, v


def expected(init, grads, flags, nesterov, lrs, **hp):
    hp = {**HP, **hp}
    return {n: reference(init[n], [g[n] for g in grads], lrs=lrs, momentum=hp["momentum"],
                         weight_decay=hp["weight_decay"], nesterov=nesterov, decays=flags[n])
            for n in init}


# ---- λ = 0: Keras's SGD, step for step ------------------------------------------------------------
@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_without_weight_decay_it_is_keras_sgd(nesterov, momentum, schedule):
    init, grads = make_data(seed=1, steps=6)
    lr = lr_schedule() if schedule else 0.3
    ours_vars, keras_vars = make_vars(init, tf.float32), make_vars(init, tf.float32)
    ours = SGD(lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
    keras = tf.keras.optimizers.legacy.SGD(lr, momentum=momentum, nesterov=nesterov)
    got = run_optimizer(ours, ours_vars, grads, tf.float32)
    want = run_optimizer(keras, keras_vars, grads, tf.float32)
    assert not np.allclose(got["kernel"], init["kernel"])  # the steps did something
    for n in got:  # the same kernels on the same inputs: equal bits, well inside 1e-7
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
        if momentum:
            np.testing.assert_array_equal(ours.get_slot(ours_vars[n], "momentum").numpy(),
                                          keras.get_slot(keras_vars[n], "momentum").numpy())
    # Same slots and hyper-parameter variables, so a Keras SGD checkpoint restores into it.
    assert [v.name for v in ours.variables()] == [v.name for v in keras.variables()]


# ---- λ > 0: the numpy reference -----------------------------------------------------------------
@pytest.mark.parametrize("exclusions", list(EXCLUSIONS))
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_reference_float64(nesterov, exclusions):
    kwargs, flags = EXCLUSIONS[exclusions]
    init, grads = make_data(seed=2)
    schedule = lr_schedule()
    lrs = step_lrs(schedule)
    assert len(set(lrs)) == STEPS  # the LR varies, so LR-inside vs LR-outside would show
    variables = make_vars(init, tf.float64)
    opt = SGD(**{**HP, "learning_rate": schedule}, nesterov=nesterov, **kwargs)
    got = run_optimizer(opt, variables, grads, tf.float64)
    want = expected(init, grads, flags, nesterov, lrs)
    for n in got:
        np.testing.assert_allclose(got[n], want[n][0], rtol=1e-12, atol=1e-14, err_msg=n)
        # Keras's sign: the slot holds −v.
        np.testing.assert_allclose(opt.get_slot(variables[n], "momentum").numpy(), -want[n][1],
                                   rtol=1e-12, atol=1e-14, err_msg=n)
    # The decay is really in there: without it the kernel ends elsewhere.
    no_wd = expected(init, grads, flags, nesterov, lrs, weight_decay=0.0)
    if flags["kernel"]:
        assert np.abs(got["kernel"] - no_wd["kernel"][0]).max() > 1e-3


def test_without_momentum_it_is_gradient_descent_on_the_decayed_gradient():
    init, grads = make_data(seed=3)
    variables = make_vars(init, tf.float64)
    opt = SGD(learning_rate=0.75, momentum=0.0, weight_decay=0.05)
    got = run_optimizer(opt, variables, grads, tf.float64)
    want = expected(init, grads, EXCLUSIONS["default"][1], False, [0.75] * STEPS, momentum=0.0)
    for n in got:
        np.testing.assert_allclose(got[n], want[n][0], rtol=1e-12, atol=1e-14, err_msg=n)
    assert opt.variables() == [opt.iterations]  # no momentum slot, as Keras's SGD


def test_momentum_correction_gives_goyal_reference_form():
    """With Goyal's momentum correction m·η_t/η_{t−1} (schedules.WarmupMomentumCorrection), the
    LR-inside form is Goyal's eq. 9 during the warmup: u ← m·u + (g + λw); w ← w − η_t·u."""
    init, grads = make_data(seed=4, steps=6)
    warmup = WarmupPolyDecay(peak_lr=2.0, total_steps=20, warmup_steps=10, warmup_start_lr=0.1)
    lrs = step_lrs(warmup, 6)
    corrected = SGD(warmup, momentum=WarmupMomentumCorrection(warmup, momentum=0.875),
                    weight_decay=0.05)
    plain = SGD(warmup, momentum=0.875, weight_decay=0.05)
    got = run_optimizer(corrected, make_vars(init, tf.float64), grads, tf.float64)
    uncorrected = run_optimizer(plain, make_vars(init, tf.float64), grads, tf.float64)
    for n, decays in EXCLUSIONS["default"][1].items():
        w, u = np.array(init[n]), np.zeros_like(init[n])
        for g, lr in zip(grads, lrs):
            u = 0.875 * u + (g[n] + (0.05 if decays else 0.0) * w)
            w = w - lr * u
        # The corrected momentum is a float32 schedule value: agreement to float32 rounding.
        np.testing.assert_allclose(got[n], w, rtol=1e-6, err_msg=n)
        assert np.abs(uncorrected[n] - w).max() > 1e-2, n  # and the correction matters


# ---- exclusions: BN γ/β and biases ----------------------------------------------------------------
def _cnn():
    tf.keras.utils.set_random_seed(5)
    return tf.keras.Sequential([
        tf.keras.Input((6, 6, 2)),
        tf.keras.layers.Conv2D(3, 3, name="conv"),
        tf.keras.layers.BatchNormalization(name="bn"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(2, name="fc"),
    ])


@pytest.mark.parametrize("patterns, decayed", [
    (None, ["conv/kernel", "fc/kernel"]),                       # the default: rank <= 1 excluded
    ([], ["conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "fc/kernel", "fc/bias"]),
    (["fc"], ["conv/kernel", "conv/bias", "bn/gamma", "bn/beta"]),  # a regex replaces the default
])
def test_bn_and_bias_get_no_weight_decay(patterns, decayed):
    model = _cnn()
    variables = model.trainable_variables
    before = {v.name.split(":")[0]: v.numpy().copy() for v in variables}
    assert sorted(before) == sorted(["conv/kernel", "conv/bias", "bn/gamma", "bn/beta",
                                     "fc/kernel", "fc/bias"])
    opt = SGD(learning_rate=0.5, momentum=0.9, weight_decay=0.1,
              exclude_from_weight_decay=patterns)
    assert sorted(v.name.split(":")[0] for v in variables if opt.uses_weight_decay(v)) == sorted(decayed)
    # A zero gradient: a decayed variable shrinks by exactly (1 − η·λ), the others stay put.
    opt.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    for v in variables:
        name = v.name.split(":")[0]
        factor = 1 - 0.5 * 0.1 if name in decayed else 1.0
        np.testing.assert_allclose(v.numpy(), before[name] * factor, rtol=1e-6, err_msg=name)
        if name not in decayed:
            np.testing.assert_array_equal(v.numpy(), before[name])


def test_without_weight_decay_nothing_decays():
    kernel = tf.Variable(tf.ones((2, 3)), name="fc/kernel")
    assert not SGD(weight_decay=0.0).uses_weight_decay(kernel)
    assert SGD(weight_decay=1e-4).uses_weight_decay(kernel)


@pytest.mark.parametrize("nesterov", [False, True])
def test_equals_lars_you_with_unit_trust_ratio(nesterov):
    """SGD is LARS's ``you`` variant with every variable excluded from layer adaptation."""
    init, grads = make_data(seed=6)
    schedule = lr_schedule()
    sgd = run_optimizer(SGD(**{**HP, "learning_rate": schedule}, nesterov=nesterov),
                        make_vars(init, tf.float64), grads, tf.float64)
    lars = LARS(**{**HP, "learning_rate": schedule}, nesterov=nesterov, variant="you",
                exclude_from_layer_adaptation=["."])
    got = run_optimizer(lars, make_vars(init, tf.float64), grads, tf.float64)
    for n in got:
        np.testing.assert_allclose(sgd[n], got[n], rtol=1e-12, atol=1e-14, err_msg=n)


# ---- traced and XLA -----------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
def test_inside_tf_function(jit):
    init, grads = make_data(seed=7)
    variables = make_vars(init, tf.float64)
    opt = SGD(**HP, nesterov=True)
    first, last = run_traced(opt, variables, grads, tf.float64, jit)
    assert last == first  # later steps reuse the graph
    want = expected(init, grads, EXCLUSIONS["default"][1], True, [HP["learning_rate"]] * STEPS)
    for n in variables:
        np.testing.assert_allclose(variables[n].numpy(), want[n][0], rtol=1e-12, atol=1e-14,
                                   err_msg=n)
    assert int(opt.iterations.numpy()) == STEPS


# ---- sparse gradients -----------------------------------------------------------------------------
def _sparse_grad(table):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, [1, 3, 3]) ** 2)  # row 3 twice
    grad = tape.gradient(loss, table)
    assert isinstance(grad, tf.IndexedSlices)
    return grad


def _table(seed=9):
    return tf.Variable(np.random.default_rng(seed).normal(size=(10, 4)), name="embedding/embeddings")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_gradient_with_weight_decay_takes_the_dense_step(momentum):
    """λ·w is dense: every row decays, exactly as with the densified gradient."""
    sparse_table, dense_table = _table(), _table()
    before = sparse_table.numpy().copy()
    sparse_opt = SGD(0.5, momentum=momentum, weight_decay=0.1)
    dense_opt = SGD(0.5, momentum=momentum, weight_decay=0.1)
    for _ in range(3):
        sparse_opt.apply_gradients([(_sparse_grad(sparse_table), sparse_table)])
        dense_opt.apply_gradients([(tf.convert_to_tensor(_sparse_grad(dense_table)), dense_table)])
    np.testing.assert_allclose(sparse_table.numpy(), dense_table.numpy(), rtol=1e-14, atol=1e-15)
    assert not np.any(np.isclose(sparse_table.numpy(), before))  # every row moved, untouched ones too


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_gradient_without_weight_decay_is_keras_sparse_step(momentum):
    ours_table, keras_table = _table(), _table()
    before = ours_table.numpy().copy()
    ours = SGD(0.5, momentum=momentum, weight_decay=0.1, exclude_from_weight_decay=["embedding"])
    keras = tf.keras.optimizers.legacy.SGD(0.5, momentum=momentum)
    for _ in range(3):
        ours.apply_gradients([(_sparse_grad(ours_table), ours_table)])
        keras.apply_gradients([(_sparse_grad(keras_table), keras_table)])
    np.testing.assert_array_equal(ours_table.numpy(), keras_table.numpy())
    untouched = [0, 2, 4, 5, 6, 7, 8, 9]
    np.testing.assert_array_equal(ours_table.numpy()[untouched], before[untouched])


# ---- config ---------------------------------------------------------------------------------------
CTOR_ARGS = ("learning_rate", "momentum", "nesterov", "weight_decay", "exclude_from_weight_decay",
             "name")


def _custom_opt(learning_rate, momentum=0.8):
    return SGD(learning_rate=learning_rate, momentum=momentum, nesterov=True, weight_decay=5e-5,
               exclude_from_weight_decay=[RANK_LE_1, "head"], name="MySGD")


def test_get_config_has_every_constructor_argument():
    config = _custom_opt(0.25).get_config()
    assert set(CTOR_ARGS) <= set(config)
    assert config["learning_rate"] == pytest.approx(0.25)
    assert config["momentum"] == pytest.approx(0.8)
    assert config["nesterov"] is True and config["weight_decay"] == 5e-5
    assert config["exclude_from_weight_decay"] == [RANK_LE_1, "head"]
    assert config["name"] == "MySGD"
    default = SGD().get_config()  # the defaults are explicit too
    assert default["exclude_from_weight_decay"] == [RANK_LE_1]
    assert (default["weight_decay"], default["momentum"], default["nesterov"]) == (0.0, 0.0, False)


@pytest.mark.parametrize("schedules", [False, True])
def test_from_config_round_trip(schedules):
    lr = lr_schedule() if schedules else 0.25
    momentum = WarmupMomentumCorrection(lr, momentum=0.8) if schedules else 0.8
    opt = _custom_opt(lr, momentum)
    config = opt.get_config()
    rebuilt = SGD.from_config(copy.deepcopy(config))
    assert type(rebuilt) is SGD and rebuilt.get_config() == config
    for attr in ("weight_decay", "nesterov", "exclude_from_weight_decay"):
        assert getattr(rebuilt, attr) == getattr(opt, attr), attr
    # Keras's own (de)serialization finds the class by its registered name.
    again = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt), use_legacy_optimizer=True)
    assert type(again) is SGD and again.get_config() == config
    if schedules:
        assert isinstance(config["momentum"], dict)
        m = rebuilt._momentum_schedule
        assert isinstance(m, WarmupMomentumCorrection)
        assert float(m(1).numpy()) == pytest.approx(float(momentum(1).numpy()))
        assert float(m(1).numpy()) != pytest.approx(0.8)  # the correction is really in there


@pytest.mark.parametrize("exclusions", list(EXCLUSIONS))
def test_weight_decay_and_exclusions_survive_horovod_wrapping(hvd, exclusions):
    kwargs, flags = EXCLUSIONS[exclusions]
    opt = SGD(**HP, nesterov=True, **kwargs)
    wrapped = hvd.DistributedOptimizer(opt)  # rebuilt with from_config(get_config())
    assert wrapped is not opt and isinstance(wrapped, SGD)
    base, cfg = opt.get_config(), wrapped.get_config()
    for key in CTOR_ARGS:
        if key != "name":  # Horovod renames it DistributedSGD
            assert cfg[key] == base[key], key
    init, grads = make_data(seed=8)
    variables = make_vars(init, tf.float64)
    for n, var in variables.items():
        assert wrapped.uses_weight_decay(var) == flags[n], n
    # A single-rank allreduce is the identity, so the wrapped update is the reference's.
    got = run_optimizer(wrapped, variables, grads, tf.float64)
    want = expected(init, grads, flags, True, [HP["learning_rate"]] * STEPS)
    for n in got:
        np.testing.assert_allclose(got[n], want[n][0], rtol=1e-12, atol=1e-14, err_msg=n)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
    (dict(momentum=-0.1), r"momentum must be in \[0, 1\], got -0.1"),
    (dict(learning_rate=-0.1), "learning_rate must be >= 0"),
    (dict(exclude_from_weight_decay=["(unclosed"]), "'[(]unclosed' is not a valid regex"),
    (dict(exclude_from_weight_decay=["@rank<=2"]), "unknown exclusion token '@rank<=2'"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SGD(**kwargs)


# ---- the registry's "sgd" -------------------------------------------------------------------------
def test_build_optimizer_passes_weight_decay_and_exclusions():
    cfg = OptimizerConfig(name="sgd", momentum=0.8, nesterov=True, weight_decay=5e-5,
                          exclude_from_weight_decay=(RANK_LE_1, "head"))
    opt = registry.build_optimizer(cfg, learning_rate=0.25)
    assert type(opt) is SGD
    assert (opt.weight_decay, opt.nesterov) == (5e-5, True)
    assert opt.exclude_from_weight_decay == (RANK_LE_1, "head")
    assert float(opt._get_hyper("momentum")) == pytest.approx(0.8)
    # The training config's defaults: weight decay 5e-4, rank <= 1 excluded, as LARS gets them.
    default = registry.build_optimizer(train_config.load(None, ["optimizer.name=sgd"]).optimizer, 0.1)
    lars = registry.build_optimizer(train_config.load(None, ["optimizer.name=lars"]).optimizer, 0.1)
    assert default.weight_decay == lars.weight_decay == 5e-4
    assert default.exclude_from_weight_decay == lars.exclude_from_weight_decay == (RANK_LE_1,)
    # The trainer attaches a trust-ratio monitor only to layer-wise optimizers.
    assert not hasattr(default, "trust_ratios")


def test_build_optimizer_takes_a_momentum_schedule():
    warmup = WarmupPolyDecay(peak_lr=2.0, total_steps=20, warmup_steps=10, warmup_start_lr=0.1)
    momentum = WarmupMomentumCorrection(warmup, momentum=0.9)
    opt = registry.build_optimizer(OptimizerConfig(name="sgd"), warmup, momentum=momentum)
    assert opt._momentum_schedule is momentum
    kernel = tf.Variable(tf.ones((2, 2)), name="fc/kernel")
    opt.apply_gradients([(tf.ones((2, 2)), kernel)])  # step 0: η = 0.1, no history yet
    np.testing.assert_allclose(kernel.numpy(), 1 - 0.1 * (1 + 5e-4), rtol=1e-6)
