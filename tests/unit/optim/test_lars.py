"""LARS (knl_train/optim/lars.py) against an independent float64 numpy reference and against the
published test vectors (lars.md §4.1-§4.2); which variables its exclusion rules name, config
round trip, Horovod wrapping, mixed bfloat16 and XLA.

The numerical tests run on both implementations (fixture ``lars_path``): the fused C++ op
(knl_train/optim/kernels) and the pure-TF path. The loader and the op's own properties
(bfloat16, determinism) are tested in test_kernels.py, the rules themselves in test_exclusion.py."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import tensorflow as tf

from knl_train.models import build
from knl_train.optim import LARS, WarmupPolyDecay, kernels
from knl_train.optim.exclusion import RANK_LE_1
from knl_train.optim.lars import VARIANTS
from tests.support.optim_cases import (KERNEL_SHAPE, STEPS, make_data, make_vars, run_optimizer,
                                       run_traced)

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


# ---- one multi-variable op per step (fused path) ----------------------------------------------------
@pytest.fixture()
def fused(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "fused")
    info = kernels.status()
    if not info["fused"]:
        pytest.skip(f"fused LARS op unavailable: {info['reason']}; run 'make env'")


def _cnn_variables(dtype, seed=12):
    """Copies of small_cnn's 14 trainable variables (5 adapted, 9 of rank 1) in ``dtype``, with
    their names, and a fixed gradient sequence for them."""
    tf.keras.utils.set_random_seed(seed)
    model = build("small_cnn", num_classes=4, image_size=16)
    variables = [tf.Variable(tf.cast(v, dtype), name=v.name.split(":")[0])
                 for v in model.trainable_variables]
    rng = np.random.default_rng(seed)
    grads = [[tf.constant(rng.normal(size=v.shape) * 0.1 * (k + 1), dtype) for v in variables]
             for k in range(3)]
    return variables, grads


def _state(opt, variables):
    """Bytes of every weight, momentum slot and trust-ratio slot."""
    return [x.numpy().tobytes() for v in variables for x in (
        v, opt.get_slot(v, "momentum"), opt.get_slot(v, "trust_ratio"))]


def _run_steps(opt, variables, grads, traced):
    """Apply ``grads`` eagerly or through one tf.function; returns the final state and the
    fused ops the step used (eagerly: not known, None)."""
    def step(gs):
        opt.apply_gradients(zip(gs, variables))
    apply = tf.function(step) if traced else step
    for gs in grads:
        apply(gs)
    used = None
    if traced:
        graph = apply.get_concrete_function(grads[0]).graph
        used = {op.type for op in graph.get_operations()} & {"KnlLarsApply", "KnlLarsApplyMulti"}
    return _state(opt, variables), used


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_op_per_step_equals_one_op_per_variable(monkeypatch, variant, dtype):
    """The multi-variable op and the per-variable op give the same bits for every weight, slot
    and trust ratio, eagerly and traced, with a learning-rate schedule and nesterov."""
    sched = WarmupPolyDecay(peak_lr=1.2, total_steps=6, warmup_steps=2, warmup_start_lr=0.1)
    make = lambda: LARS(**{**HP, "learning_rate": sched}, variant=variant, nesterov=True)  # noqa: E731
    results = {}
    for path in ("multi", "per-variable"):
        if path == "per-variable":
            monkeypatch.setattr(LARS, "_fused_groups", lambda self, *args: None)
        for traced in (False, True):
            variables, grads = _cnn_variables(dtype)
            opt = make()
            results[path, traced], used = _run_steps(opt, variables, grads, traced)
            if traced:
                assert used == {"KnlLarsApplyMulti" if path == "multi" else "KnlLarsApply"}
            ratios = opt.trust_ratios(include_excluded=True)
            assert len(ratios) == 14
            assert sum(r != 1.0 for r in ratios.values()) == 5  # the adapted ones moved
            assert int(opt.iterations.numpy()) == 3
    assert results["multi", False] == results["per-variable", False]
    assert results["multi", True] == results["per-variable", True]


@pytest.mark.usefixtures("fused")
def test_constraints_apply_after_the_multi_op(monkeypatch):
    """A constrained variable is projected after the step, as Keras' per-variable loop does."""
    def run():
        rng = np.random.default_rng(13)
        kernel = tf.Variable(rng.normal(size=(6, 4)), name="fc/kernel",
                             constraint=lambda w: tf.clip_by_value(w, -0.5, 0.5))
        bias = tf.Variable(rng.normal(size=4), name="fc/bias")
        opt = LARS(**HP)
        for k in range(3):
            opt.apply_gradients([(tf.constant(rng.normal(size=v.shape) * (k + 1)), v)
                                 for v in (kernel, bias)])
        assert np.abs(kernel.numpy()).max() <= 0.5 and np.abs(bias.numpy()).max() > 0.5
        return _state(opt, [kernel, bias])
    multi = run()
    monkeypatch.setattr(LARS, "_fused_groups", lambda self, *args: None)
    assert run() == multi


@pytest.mark.usefixtures("fused")
def test_horovod_step_is_one_multi_op(hvd, monkeypatch):
    """Through hvd.DistributedOptimizer (rebuilt from get_config, base apply_gradients after
    the allreduce) a step is one KnlLarsApplyMulti and the iteration count: no per-variable
    op, no slot assignment; the slots hold the same trust ratios, and the weights the same
    bits, as a plain LARS applying one op per variable."""
    variables, grads = _cnn_variables(tf.float32)
    opt = LARS(**HP, variant="you")
    wrapped = hvd.DistributedOptimizer(opt)
    assert isinstance(wrapped, LARS) and wrapped is not opt
    assert {k: v for k, v in wrapped.get_config().items() if k != "name"} == {
        k: v for k, v in opt.get_config().items() if k != "name"}

    @tf.function
    def step(gs):
        wrapped.apply_gradients(zip(gs, variables))
    ops = [op.type for op in step.get_concrete_function(grads[0]).graph.get_operations()]
    assert ops.count("KnlLarsApplyMulti") == 1 and ops.count("AssignAddVariableOp") == 1
    assert not set(ops) & {"KnlLarsApply", "AssignVariableOp", "ResourceApplyKerasMomentum"}
    for gs in grads:
        step(gs)
    got = _state(wrapped, variables)
    ratios = wrapped.trust_ratios()
    assert len(ratios) == 5 and all(0.0 < r < 1.0 for r in ratios.values())

    monkeypatch.setattr(LARS, "_fused_groups", lambda self, *args: None)
    ref_vars, _ = _cnn_variables(tf.float32)
    ref = LARS(**HP, variant="you")
    assert _run_steps(ref, ref_vars, grads, traced=True) == (got, {"KnlLarsApply"})
    assert list(ref.trust_ratios().values()) == list(ratios.values())


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


# ---- published test vectors (lars.md §4.1-§4.2): all-ones 3x3 weights and gradients ----------
# Keras keeps the learning rate and momentum hyperparameters in float32 variables, so 0.1 and
# 0.9 enter even a float64 update as their float32 roundings: the float64 results drift by up to
# ~3e-8 relative over these steps, so the checks use rtol 1e-7 (the original tf.contrib test used
# 1e-6).
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


# ---- mixed bfloat16 and XLA: float32 slots, finite training, same math as eager ---------------
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
