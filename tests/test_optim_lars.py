"""LARS (knl_train/optim/lars.py) against an independent float64 numpy reference, plus its
exclusion rules (knl_train/optim/exclusion.py), config round trip and Horovod wrapping.

The numerical tests run on both implementations (fixture ``lars_path``): the fused C++ op
(knl_train/optim/kernels) and the pure-TF path. The loader and the op's own properties
(bfloat16, determinism) are tested in test_optim_kernels.py."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import tensorflow as tf

from optim_cases import KERNEL_SHAPE, STEPS, make_data, make_vars, run_optimizer, run_traced
from knl_train.optim import LARS, WarmupPolyDecay, kernels
from knl_train.optim.exclusion import RANK_LE_1, ExclusionRule
from knl_train.optim.lars import VARIANTS

# Hyper-parameters chosen so every term is visible at 1e-12: weight decay is a few percent of
# the gradient, ε is comparable to the norms, t is far from 1. The learning rate and momentum
# are Keras hyper-parameters, held in float32 variables whatever the model dtype, so they are
# exactly representable in float32 here.
HP = dict(learning_rate=0.75, momentum=0.875, weight_decay=0.05, trust_coefficient=0.02,
          epsilon=0.3)

# name -> (LARS kwargs, {var: (uses_weight_decay, uses_adaptation)}) written out by hand, not
# derived from ExclusionRule, so the reference is independent of exclusion.py.
EXCLUSIONS = {
    "default": (dict(), {"kernel": (True, True), "bias": (False, False)}),
    "none": (dict(exclude_from_weight_decay=[], exclude_from_layer_adaptation=[]),
             {"kernel": (True, True), "bias": (True, True)}),
    # Regexes alone replace the default: the bias gets weight decay, the kernel does not.
    "regex": (dict(exclude_from_weight_decay=["kern"], exclude_from_layer_adaptation=["/bias"]),
              {"kernel": (False, True), "bias": (True, False)}),
    # The token plus a regex adds to the default.
    "additive": (dict(exclude_from_weight_decay=[RANK_LE_1],
                      exclude_from_layer_adaptation=[RANK_LE_1, "dense/ker"]),
                 {"kernel": (True, False), "bias": (False, False)}),
}


# ---- reference ---------------------------------------------------------------------------------
def reference(w0, grads, *, lrs, momentum, weight_decay, trust_coefficient, epsilon, nesterov,
              variant, use_wd, adapt):
    """Float64 LARS per the formulas in lars.py's docstring. Returns (w, v) after all steps;
    ``lrs`` is the learning rate of each step. v is the velocity (+v for every variant)."""
    w = np.array(w0, dtype=np.float64)
    v = np.zeros_like(w)
    beta = weight_decay if use_wd else 0.0
    m, eta, eps = momentum, trust_coefficient, epsilon

    def ratio(w_norm, denom):
        if not adapt or w_norm == 0 or denom == 0:
            return 1.0
        return eta * w_norm / denom

    for g, lr in zip(grads, lrs):
        g = np.asarray(g, dtype=np.float64)
        w_norm = np.sqrt(np.sum(w * w))
        if variant == "model_garden":
            gd = g + beta * w
            t = ratio(w_norm, np.sqrt(np.sum(gd * gd)) + eps)
        else:
            gd = g + beta * w
            t = ratio(w_norm, np.sqrt(np.sum(g * g)) + beta * w_norm + eps)
        if variant in ("you", "model_garden"):
            v = m * v + lr * t * gd
            w = w - (m * v + lr * t * gd) if nesterov else w - v
        else:  # tf_contrib: v accumulates the raw gradient; β only enters t.
            v = m * v + g
            w = w - lr * t * g - lr * t * m * v if nesterov else w - lr * t * v
    return w, v


# ---- fixtures -----------------------------------------------------------------------------------


def expected(init, grads, flags, variant, nesterov, dtype=np.float64, lrs=None, **hp):
    hp = {**HP, **hp}
    lrs = lrs if lrs is not None else [hp["learning_rate"]] * len(grads)
    out = {}
    for n in init:
        use_wd, adapt = flags[n]
        out[n] = reference(np.asarray(init[n], dtype), [np.asarray(g[n], dtype) for g in grads],
                           lrs=lrs, momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                           trust_coefficient=hp["trust_coefficient"], epsilon=hp["epsilon"],
                           nesterov=nesterov, variant=variant, use_wd=use_wd, adapt=adapt)
    return out


@pytest.fixture(params=["fused", "tf"])
def lars_path(request, monkeypatch):
    """Run the test on the fused op, then on the pure-TF path. The fused run is forced
    (KNL_TRAIN_LARS_KERNEL=fused, no silent fallback) and skipped, with the reason, when the
    op is not built in this environment."""
    monkeypatch.setenv(kernels.ENV_VAR, request.param)
    if request.param == "fused":
        info = kernels.status()
        if not info["fused"]:
            pytest.skip(f"fused LARS op unavailable: {info['reason']}; run 'make env'")
    return request.param


# ---- numerics against the reference -------------------------------------------------------------
@pytest.mark.usefixtures("lars_path")
@pytest.mark.parametrize("exclusions", list(EXCLUSIONS))
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_float64(variant, nesterov, exclusions):
    kwargs, flags = EXCLUSIONS[exclusions]
    init, grads = make_data(seed=1)
    variables = make_vars(init, tf.float64)
    opt = LARS(**HP, nesterov=nesterov, variant=variant, **kwargs)
    got = run_optimizer(opt, variables, grads, tf.float64)
    want = expected(init, grads, flags, variant, nesterov)
    for n in variables:
        assert opt.uses_weight_decay(variables[n]) == flags[n][0], n
        assert opt.uses_adaptation(variables[n]) == flags[n][1], n
        np.testing.assert_allclose(got[n], want[n][0], rtol=1e-12, atol=1e-14, err_msg=n)
        # The momentum slot: -v for the Keras-momentum variants, +v for tf_contrib.
        sign = 1.0 if variant == "tf_contrib" else -1.0
        np.testing.assert_allclose(opt.get_slot(variables[n], "momentum").numpy(),
                                   sign * want[n][1], rtol=1e-12, atol=1e-14, err_msg=n)
    assert int(opt.iterations.numpy()) == STEPS


@pytest.mark.usefixtures("lars_path")
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_float32(variant, nesterov):
    kwargs, flags = EXCLUSIONS["default"]
    init, grads = make_data(seed=2)
    init32 = {n: a.astype(np.float32) for n, a in init.items()}
    grads32 = [{n: a.astype(np.float32) for n, a in g.items()} for g in grads]
    variables = make_vars(init32, tf.float32)
    opt = LARS(**HP, nesterov=nesterov, variant=variant, **kwargs)
    got = run_optimizer(opt, variables, grads32, tf.float32)
    want = expected(init32, grads32, flags, variant, nesterov)
    for n in variables:
        assert got[n].dtype == np.float32
        np.testing.assert_allclose(got[n], want[n][0], rtol=1e-5, atol=1e-6, err_msg=n)


def _canonical(variant, nesterov, use_wd, adapt):
    """Cases the formulas make identical (for a constant learning rate): with t = 1, tf_contrib
    and the other two are plain momentum (plus βw for you/model_garden); with β = 0, you and
    model_garden coincide."""
    if not adapt:
        return ("momentum", nesterov) if variant == "tf_contrib" or not use_wd else (
            "momentum+wd", nesterov)
    if variant != "tf_contrib" and not use_wd:
        return ("lars-no-wd", nesterov)
    return (variant, nesterov, use_wd)


def test_the_cases_are_distinguishable():
    """The reference results of cases the formulas do not make identical differ by far more
    than the tolerance, so the comparisons above cannot pass by accident (e.g. with weight
    decay or adaptation applied to the wrong variable, or the wrong variant)."""
    init, grads = make_data(seed=1)
    results = {}
    for variant, nesterov, use_wd, adapt in itertools.product(
            VARIANTS, (False, True), (False, True), (False, True)):
        for n in init:
            results[(n, variant, nesterov, use_wd, adapt)] = reference(
                init[n], [g[n] for g in grads], lrs=[HP["learning_rate"]] * STEPS,
                momentum=HP["momentum"], weight_decay=HP["weight_decay"],
                trust_coefficient=HP["trust_coefficient"], epsilon=HP["epsilon"],
                nesterov=nesterov, variant=variant, use_wd=use_wd, adapt=adapt)[0]
    distinct = 0
    for (ka, a), (kb, b) in itertools.combinations(results.items(), 2):
        if ka[0] != kb[0]:
            continue
        if _canonical(*ka[1:]) == _canonical(*kb[1:]):
            np.testing.assert_allclose(a, b, rtol=1e-13, err_msg=f"{ka} {kb}")
        else:
            distinct += 1
            assert np.max(np.abs(a - b)) > 1e-6 * np.max(np.abs(a)), (ka, kb)
    assert distinct > 100


@pytest.mark.usefixtures("lars_path")
def test_epsilon_enters_the_ratio():
    init, grads = make_data(seed=3)
    flags = EXCLUSIONS["none"][1]
    for eps in (0.0, 2.5):
        variables = make_vars(init, tf.float64)
        opt = LARS(**{**HP, "epsilon": eps}, variant="you", exclude_from_weight_decay=[],
                   exclude_from_layer_adaptation=[])
        got = run_optimizer(opt, variables, grads, tf.float64)
        want = expected(init, grads, flags, "you", False, epsilon=eps)
        for n in got:
            np.testing.assert_allclose(got[n], want[n][0], rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("lars_path")
def test_learning_rate_schedule_is_applied_per_step():
    sched = WarmupPolyDecay(peak_lr=1.2, total_steps=6, warmup_steps=2, warmup_start_lr=0.1,
                            end_lr=0.05, power=2.0)
    lrs = [float(sched(k).numpy()) for k in range(STEPS)]
    assert len(set(lrs)) == STEPS  # the schedule really varies over these steps
    init, grads = make_data(seed=4)
    flags = EXCLUSIONS["default"][1]
    for variant in VARIANTS:
        variables = make_vars(init, tf.float64)
        opt = LARS(**{**HP, "learning_rate": sched}, variant=variant, nesterov=True)
        got = run_optimizer(opt, variables, grads, tf.float64)
        want = expected(init, grads, flags, variant, True, lrs=lrs)
        for n in got:
            np.testing.assert_allclose(got[n], want[n][0], rtol=1e-12, atol=1e-14,
                                       err_msg=f"{variant}/{n}")


@pytest.mark.usefixtures("lars_path")
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_inside_tf_function(variant, jit):
    kwargs, flags = EXCLUSIONS["regex"]
    init, grads = make_data(seed=5)
    variables = make_vars(init, tf.float64)
    opt = LARS(**HP, variant=variant, nesterov=True, **kwargs)
    names = list(variables)
    first, last = run_traced(opt, variables, grads, tf.float64, jit)
    assert last == first  # later steps reuse the graph
    want = expected(init, grads, flags, variant, True)
    for n in names:
        np.testing.assert_allclose(variables[n].numpy(), want[n][0], rtol=1e-12, atol=1e-14,
                                   err_msg=n)
    assert int(opt.iterations.numpy()) == STEPS


# ---- degenerate norms ---------------------------------------------------------------------------
@pytest.mark.usefixtures("lars_path")
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_weights_give_plain_momentum(variant, nesterov):
    """‖w‖ = 0 → t = 1: the first step is exactly a (Keras or TF) momentum step at lr."""
    rng = np.random.default_rng(6)
    g1, g2 = rng.normal(size=KERNEL_SHAPE), rng.normal(size=KERNEL_SHAPE)
    var = tf.Variable(tf.zeros(KERNEL_SHAPE, tf.float64), name="dense/kernel")
    lr, m = HP["learning_rate"], HP["momentum"]
    opt = LARS(**HP, nesterov=nesterov, variant=variant)
    assert opt.uses_weight_decay(var) and opt.uses_adaptation(var)
    opt.apply_gradients([(tf.constant(g1), var)])
    # v = lr·g (you/model_garden: βw = 0) or v = g (tf_contrib), t = 1 in both.
    want1 = -lr * (1 + m) * g1 if nesterov else -lr * g1
    np.testing.assert_allclose(var.numpy(), want1, rtol=1e-12)
    # A second step from these (nonzero) weights matches the reference started from zero.
    opt.apply_gradients([(tf.constant(g2), var)])
    want2, _ = reference(np.zeros(KERNEL_SHAPE), [g1, g2], lrs=[lr, lr], momentum=m,
                         weight_decay=HP["weight_decay"],
                         trust_coefficient=HP["trust_coefficient"], epsilon=HP["epsilon"],
                         nesterov=nesterov, variant=variant, use_wd=True, adapt=True)
    np.testing.assert_allclose(var.numpy(), want2, rtol=1e-12)


@pytest.mark.usefixtures("lars_path")
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_denominator_gives_unit_ratio(variant):
    """g = 0, no weight decay, ε = 0: the denominator is 0, so t = 1 (no NaN/inf), and the
    step is carried by momentum alone."""
    rng = np.random.default_rng(7)
    w0, g1 = rng.normal(size=KERNEL_SHAPE), rng.normal(size=KERNEL_SHAPE)
    var = tf.Variable(w0, name="dense/kernel")
    opt = LARS(learning_rate=0.5, momentum=0.875, weight_decay=0.0, trust_coefficient=0.01,
               epsilon=0.0, variant=variant)
    grads = [g1, np.zeros(KERNEL_SHAPE)]
    for g in grads:
        opt.apply_gradients([(tf.constant(g), var)])
    assert np.all(np.isfinite(var.numpy()))
    want, _ = reference(w0, grads, lrs=[0.5, 0.5], momentum=0.875, weight_decay=0.0,
                        trust_coefficient=0.01, epsilon=0.0, nesterov=False, variant=variant,
                        use_wd=False, adapt=True)
    np.testing.assert_allclose(var.numpy(), want, rtol=1e-12)
    # By hand: step 1 has t1 = η‖w0‖/‖g1‖. In step 2, tf_contrib moves w by lr·t·v = lr·1·m·g1
    # (t = 1, not NaN); for the others lr·t multiplies a zero gradient, w moves by m·v.
    t1 = 0.01 * np.linalg.norm(w0) / np.linalg.norm(g1)
    w1 = w0 - 0.5 * t1 * g1
    step2 = 0.5 * 0.875 * g1 if variant == "tf_contrib" else 0.875 * 0.5 * t1 * g1
    np.testing.assert_allclose(var.numpy(), w1 - step2, rtol=1e-12)


# ---- argument validation ------------------------------------------------------------------------
@pytest.mark.parametrize("arg", ["momentum", "weight_decay", "trust_coefficient", "epsilon"])
def test_negative_hyperparameters_raise(arg):
    with pytest.raises(ValueError, match=arg):
        LARS(**{arg: -0.01})
    LARS(**{arg: 0.0})  # zero is allowed


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="variant"):
        LARS(variant="lamb")


@pytest.mark.parametrize("which", ["exclude_from_weight_decay", "exclude_from_layer_adaptation"])
@pytest.mark.parametrize("patterns", [["(unclosed"], [RANK_LE_1, "bad[regex"], ["@rank<=2"]])
def test_bad_exclusion_patterns_raise(which, patterns):
    with pytest.raises(ValueError):
        LARS(**{which: patterns})


# ---- exclusion rules ----------------------------------------------------------------------------
def test_exclusion_rule_semantics():
    scalar = tf.Variable(1.0, name="block/scale")
    bias = tf.Variable(tf.zeros(3), name="conv1_bn/gamma")
    kernel = tf.Variable(tf.zeros((2, 3)), name="head/kernel")
    conv = tf.Variable(tf.zeros((3, 3, 2, 4)), name="conv1/kernel")

    default = ExclusionRule.from_config(None)
    assert default.patterns == (RANK_LE_1,)
    assert [default.matches(v) for v in (scalar, bias, kernel, conv)] == [True, True, False, False]

    empty = ExclusionRule.from_config([])
    assert empty.patterns == ()
    assert not any(empty.matches(v) for v in (scalar, bias, kernel, conv))

    # A list of regexes replaces the default ...
    head = ExclusionRule.from_config(["^head/"])
    assert [head.matches(v) for v in (scalar, bias, kernel, conv)] == [False, False, True, False]
    # ... the token adds the default back, and a bare string is one pattern.
    both = ExclusionRule.from_config([RANK_LE_1, "head"])
    assert [both.matches(v) for v in (scalar, bias, kernel, conv)] == [True, True, True, False]
    assert ExclusionRule.from_config("conv1/").patterns == ("conv1/",)
    assert ExclusionRule.from_config("conv1/").matches(conv)
    # re.search, not re.match: a pattern can match the middle of a name.
    assert ExclusionRule.from_config(["_bn/"]).matches(bias)
    # Names are matched without TF's ":0" suffix, so an anchored pattern works.
    assert kernel.name == "head/kernel:0"
    assert ExclusionRule.from_config(["kernel$"]).matches(kernel)
    assert not ExclusionRule.from_config(["kernel:0$"]).matches(kernel)


def test_exclusions_name_the_variables():
    kernel = tf.Variable(tf.zeros((2, 3)), name="fc/kernel")
    bias = tf.Variable(tf.zeros(3), name="fc/bias")
    opt = LARS(exclude_from_layer_adaptation=[RANK_LE_1, "fc/k"])
    ex = {"weight_decay": [v.name for v in (kernel, bias) if not opt.uses_weight_decay(v)],
          "layer_adaptation": [v.name for v in (kernel, bias) if not opt.uses_adaptation(v)]}
    assert ex == {"weight_decay": [bias.name], "layer_adaptation": [kernel.name, bias.name]}
    # No weight decay at all → no variable uses it.
    assert not LARS(weight_decay=0.0).uses_weight_decay(kernel)


# ---- config ---------------------------------------------------------------------------------------
CTOR_ARGS = ("learning_rate", "momentum", "weight_decay", "trust_coefficient", "epsilon",
             "nesterov", "variant", "exclude_from_weight_decay", "exclude_from_layer_adaptation",
             "name")


def _custom_opt(learning_rate):
    return LARS(learning_rate=learning_rate, momentum=0.8, weight_decay=5e-4,
                trust_coefficient=0.02, epsilon=1e-9, nesterov=True, variant="model_garden",
                exclude_from_weight_decay=[RANK_LE_1, "head"],
                exclude_from_layer_adaptation=["bn"], name="MyLARS")


def test_get_config_has_every_constructor_argument():
    config = _custom_opt(0.25).get_config()
    assert set(CTOR_ARGS) <= set(config)
    assert config["learning_rate"] == pytest.approx(0.25)
    assert config["momentum"] == pytest.approx(0.8)
    assert config["weight_decay"] == 5e-4 and config["trust_coefficient"] == 0.02
    assert config["epsilon"] == 1e-9 and config["nesterov"] is True
    assert config["variant"] == "model_garden" and config["name"] == "MyLARS"
    assert config["exclude_from_weight_decay"] == [RANK_LE_1, "head"]
    assert config["exclude_from_layer_adaptation"] == ["bn"]
    # Defaults are explicit too.
    default = LARS().get_config()
    assert default["exclude_from_weight_decay"] == [RANK_LE_1]
    assert default["exclude_from_layer_adaptation"] == [RANK_LE_1]
    assert default["variant"] == "you" and default["nesterov"] is False


@pytest.mark.parametrize("schedule", [False, True])
def test_from_config_round_trip(schedule):
    lr = (WarmupPolyDecay(peak_lr=3.0, total_steps=100, warmup_steps=10, decay_over="global")
          if schedule else 0.25)
    opt = _custom_opt(lr)
    config = opt.get_config()
    rebuilt = LARS.from_config(copy.deepcopy(config))
    assert type(rebuilt) is LARS
    assert rebuilt.get_config() == config
    for attr in ("weight_decay", "trust_coefficient", "epsilon", "nesterov", "variant",
                 "exclude_from_weight_decay", "exclude_from_layer_adaptation"):
        assert getattr(rebuilt, attr) == getattr(opt, attr), attr
    if schedule:
        assert isinstance(config["learning_rate"], dict)
        new_lr = rebuilt._get_hyper("learning_rate")
        assert isinstance(new_lr, WarmupPolyDecay)
        assert new_lr.get_config() == lr.get_config()
        assert float(new_lr(50).numpy()) == pytest.approx(float(lr(50).numpy()))


# ---- Horovod ----------------------------------------------------------------------------------------
@pytest.mark.usefixtures("lars_path")
@pytest.mark.parametrize("exclusions", ["default", "regex", "additive"])
def test_exclusions_survive_horovod_wrapping(hvd, exclusions):
    kwargs, flags = EXCLUSIONS[exclusions]
    opt = LARS(**HP, variant="model_garden", nesterov=True, **kwargs)
    wrapped = hvd.DistributedOptimizer(opt)
    assert wrapped is not opt and isinstance(wrapped, LARS)
    base, cfg = opt.get_config(), wrapped.get_config()
    for key in CTOR_ARGS:
        if key != "name":  # Horovod renames it DistributedLARS
            assert cfg[key] == base[key], key
    init, grads = make_data(seed=8)
    variables = make_vars(init, tf.float64)
    assert variables["bias"].shape.rank == 1 and variables["kernel"].shape.rank == 2
    for n, var in variables.items():
        assert wrapped.uses_weight_decay(var) == flags[n][0], n
        assert wrapped.uses_adaptation(var) == flags[n][1], n
    # A single-rank allreduce is the identity, so the wrapped update is the reference's.
    got = run_optimizer(wrapped, variables, grads, tf.float64)
    want = expected(init, grads, flags, "model_garden", True)
    for n in got:
        np.testing.assert_allclose(got[n], want[n][0], rtol=1e-12, atol=1e-14, err_msg=n)


# ---- sparse gradients -------------------------------------------------------------------------------
@pytest.mark.usefixtures("lars_path")
def test_sparse_gradient_raises_with_clear_message():
    table = tf.Variable(np.random.default_rng(9).normal(size=(10, 4)), name="embedding/embeddings")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, [1, 3, 3]) ** 2)
    grad = tape.gradient(loss, table)
    assert isinstance(grad, tf.IndexedSlices)
    opt = LARS(exclude_from_weight_decay=[], exclude_from_layer_adaptation=[])
    before = table.numpy().copy()
    with pytest.raises(Exception, match="IndexedSlices"):
        opt.apply_gradients([(grad, table)])
    np.testing.assert_array_equal(table.numpy(), before)
    # The suggested fix works: the densified gradient goes through the dense path.
    opt.apply_gradients([(tf.convert_to_tensor(grad), table)])
    assert not np.array_equal(table.numpy(), before)
