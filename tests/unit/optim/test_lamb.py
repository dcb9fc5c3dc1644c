"""LAMB (knl_train/optim/lamb.py) against an independent float64 numpy reference, plus its
exclusions, trust ratios, config round trip, Horovod wrapping and argument checks."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import tensorflow as tf

from knl_train.optim import WarmupPolyDecay
from knl_train.optim.exclusion import RANK_LE_1
from knl_train.optim.lamb import LAMB
from tests.support import optim_cases
from tests.support.optim_cases import KERNEL_SHAPE, STEPS, make_vars, run_optimizer, run_traced

# Every term is visible at 1e-12: λ·w is a good fraction of m̂/(√v̂ + ε), ε is comparable to
# √v̂, β1/β2 are far from 1 so the bias corrections differ from step to step, and the trust
# ratios are far from 1. The learning rate is a Keras hyper-parameter, held in a float32
# variable whatever the model dtype, so it is exactly representable in float32 here; β1, β2,
# ε and λ are not (LAMB uses them in the variable's dtype).
HP = dict(learning_rate=0.375, beta_1=0.8, beta_2=0.95, epsilon=0.05, weight_decay=0.3)
DEFAULTS = dict(learning_rate=0.375)  # β1 0.9, β2 0.999, ε 1e-6, λ 0.01

# name -> (LAMB kwargs, {var: (uses_weight_decay, uses_adaptation)}), written out by hand, not
# derived from ExclusionRule, so the reference is independent of exclusion.py.
EXCLUSIONS = {
    "default": (dict(), {"kernel": (True, True), "bias": (False, False)}),
    "none": (dict(exclude_from_weight_decay=[], exclude_from_layer_adaptation=[]),
             {"kernel": (True, True), "bias": (True, True)}),
    # Regexes alone replace the default: the bias gets weight decay, the kernel does not.
    "regex": (dict(exclude_from_weight_decay=["kern"], exclude_from_layer_adaptation=["/bias$"]),
              {"kernel": (False, True), "bias": (True, False)}),
    # The token plus a regex adds to the default.
    "additive": (dict(exclude_from_weight_decay=[RANK_LE_1],
                      exclude_from_layer_adaptation=[RANK_LE_1, "dense/ker"]),
                 {"kernel": (True, False), "bias": (False, False)}),
}


# ---- reference ----------------------------------------------------------------------------------
def reference(w0, grads, *, lrs, beta_1=0.9, beta_2=0.999, epsilon=1e-6, weight_decay=0.01,
              use_wd=True, adapt=True):
    """Float64 LAMB straight from the paper's Algorithm 2 (with bias correction). Returns
    (w, m, v, trust ratio of each step); ``lrs`` is the learning rate of each step."""
    w = np.array(w0, dtype=np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    lam = weight_decay if use_wd else 0.0
    trusts = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = np.asarray(g, dtype=np.float64)
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        m_hat = m / (1 - beta_1 ** t)
        v_hat = v / (1 - beta_2 ** t)
        r = m_hat / (np.sqrt(v_hat) + epsilon) + lam * w
        w_norm, r_norm = np.sqrt(np.sum(w * w)), np.sqrt(np.sum(r * r))
        trust = w_norm / r_norm if adapt and w_norm > 0 and r_norm > 0 else 1.0
        w = w - lr * trust * r
        trusts.append(trust)
    return w, m, v, trusts


# ---- fixtures -----------------------------------------------------------------------------------
def make_data(seed=0, steps=STEPS):
    # ‖w‖ well above / below ‖r‖ (whose entries are about ±1): trust ratios far from 1.
    return optim_cases.make_data(seed, steps, kernel_scale=2.5, bias_scale=0.2, bias_shift=0.05)


def expected(init, grads, flags, hp=HP, lrs=None):
    """{var: (w, m, v, trusts)} from the reference, with this test's hyper-parameters."""
    hp = dict(hp)
    lr = hp.pop("learning_rate")
    lrs = lrs if lrs is not None else [lr] * len(grads)
    return {n: reference(init[n], [g[n] for g in grads], lrs=lrs, use_wd=flags[n][0],
                         adapt=flags[n][1], **hp) for n in init}


def check_against(opt, variables, want, rtol, atol):
    for n, var in variables.items():
        w, m, v, trusts = want[n]
        np.testing.assert_allclose(var.numpy(), w, rtol=rtol, atol=atol, err_msg=f"{n}: w")
        np.testing.assert_allclose(opt.get_slot(var, "m").numpy(), m, rtol=rtol, atol=atol,
                                   err_msg=f"{n}: m")
        np.testing.assert_allclose(opt.get_slot(var, "v").numpy(), v, rtol=rtol, atol=atol,
                                   err_msg=f"{n}: v")
        np.testing.assert_allclose(opt.get_slot(var, "trust_ratio").numpy(), trusts[-1],
                                   rtol=rtol, err_msg=f"{n}: trust ratio")


# ---- numerics against the reference -------------------------------------------------------------
@pytest.mark.parametrize("hp", ["custom", "defaults"])
@pytest.mark.parametrize("exclusions", list(EXCLUSIONS))
def test_matches_reference_float64(exclusions, hp):
    kwargs, flags = EXCLUSIONS[exclusions]
    hp = HP if hp == "custom" else DEFAULTS
    init, grads = make_data(seed=1)
    variables = make_vars(init, tf.float64)
    opt = LAMB(**hp, **kwargs)
    run_optimizer(opt, variables, grads, tf.float64)
    for n, var in variables.items():
        assert opt.uses_weight_decay(var) == flags[n][0], n
        assert opt.uses_adaptation(var) == flags[n][1], n
    check_against(opt, variables, expected(init, grads, flags, hp), rtol=1e-12, atol=1e-14)
    assert int(opt.iterations.numpy()) == STEPS


@pytest.mark.parametrize("hp", ["custom", "defaults"])
@pytest.mark.parametrize("exclusions", ["default", "none"])
def test_matches_reference_float32(exclusions, hp):
    kwargs, flags = EXCLUSIONS[exclusions]
    hp = HP if hp == "custom" else DEFAULTS
    init, grads = make_data(seed=2)
    init32 = {n: a.astype(np.float32) for n, a in init.items()}
    grads32 = [{n: a.astype(np.float32) for n, a in g.items()} for g in grads]
    variables = make_vars(init32, tf.float32)
    opt = LAMB(**hp, **kwargs)
    got = run_optimizer(opt, variables, grads32, tf.float32)
    want = expected(init32, grads32, flags, hp)
    for n in variables:
        assert got[n].dtype == np.float32
        assert opt.get_slot(variables[n], "m").dtype == tf.float32
    # β2 = 0.999 is 0.99900001 in float32, so 1 − β2 is off by 1.3e-5 relative: v carries
    # that error; w, m and the trust ratio stay within a few 1e-6.
    check_against(opt, variables, want, rtol=3e-5, atol=1e-7)


def test_the_cases_are_distinguishable():
    """Reference results of different (weight decay, adaptation) cases, of the custom and the
    default hyper-parameters, and with/without bias correction differ by far more than the
    tolerances above, so those comparisons cannot pass by accident."""
    init, grads = make_data(seed=1)
    lrs = [HP["learning_rate"]] * STEPS
    hps = {k: {a: b for a, b in hp.items() if a != "learning_rate"}
           for k, hp in (("custom", HP), ("defaults", DEFAULTS))}
    for n in init:
        gs = [g[n] for g in grads]
        results = {(hp, wd, ad): reference(init[n], gs, lrs=lrs, use_wd=wd, adapt=ad, **hps[hp])[0]
                   for hp, wd, ad in itertools.product(hps, (False, True), (False, True))}
        for (ka, a), (kb, b) in itertools.combinations(results.items(), 2):
            assert np.max(np.abs(a - b)) > 1e-6 * np.max(np.abs(a)), (n, ka, kb)
        # Without the bias correction (m, v used raw) the first step differs too.
        w, m, v, _ = reference(init[n], gs[:1], lrs=lrs[:1], **hps["custom"])
        u = m / (np.sqrt(v) + HP["epsilon"]) + HP["weight_decay"] * init[n]
        raw = init[n] - lrs[0] * np.linalg.norm(init[n]) / np.linalg.norm(u) * u
        assert np.max(np.abs(raw - w)) > 1e-4 * np.max(np.abs(w)), n
        # β2 rounded through float32 (as a Keras float32 hyper-parameter would be) shows at the
        # 1e-12 tolerance of the float64 test with the default hyper-parameters.
        exact = reference(init[n], gs, lrs=lrs, **hps["defaults"])[0]
        rounded = reference(init[n], gs, lrs=lrs, **{**hps["defaults"],
                                                      "beta_2": float(np.float32(0.999))})[0]
        assert np.max(np.abs(exact - rounded) / np.abs(exact)) > 1e-10, n


def test_learning_rate_schedule_is_applied_per_step():
    sched = WarmupPolyDecay(peak_lr=1.2, total_steps=6, warmup_steps=2, warmup_start_lr=0.1,
                            end_lr=0.05, power=2.0)
    lrs = [float(sched(k).numpy()) for k in range(STEPS)]
    assert len(set(lrs)) == STEPS  # the schedule really varies over these steps
    kwargs, flags = EXCLUSIONS["default"]
    init, grads = make_data(seed=4)
    variables = make_vars(init, tf.float64)
    opt = LAMB(**{**HP, "learning_rate": sched}, **kwargs)
    run_optimizer(opt, variables, grads, tf.float64)
    check_against(opt, variables, expected(init, grads, flags, lrs=lrs), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("jit", [False, True])
def test_inside_tf_function(jit):
    kwargs, flags = EXCLUSIONS["regex"]  # one variable with each of the two partial paths
    init, grads = make_data(seed=5)
    variables = make_vars(init, tf.float64)
    opt = LAMB(**HP, **kwargs)
    first, last = run_traced(opt, variables, grads, tf.float64, jit)
    assert last == first  # later steps reuse the graph
    check_against(opt, variables, expected(init, grads, flags), rtol=1e-12, atol=1e-14)
    assert int(opt.iterations.numpy()) == STEPS


def test_adam_only_variables_inside_tf_function():
    """Neither weight decay nor adaptation (the default for a bias): the one-kernel path."""
    kwargs, flags = EXCLUSIONS["default"]
    init, grads = make_data(seed=6)
    variables = make_vars(init, tf.float64)
    opt = LAMB(**HP, **kwargs)

    @tf.function
    def step(gk, gb):
        opt.apply_gradients([(gk, variables["kernel"]), (gb, variables["bias"])])

    for g in grads:
        step(tf.constant(g["kernel"]), tf.constant(g["bias"]))
    check_against(opt, variables, expected(init, grads, flags), rtol=1e-12, atol=1e-14)


# ---- degenerate norms ---------------------------------------------------------------------------
def test_zero_weights_give_unit_ratio():
    """‖w‖ = 0 → trust 1: the first step is w = −lr·m̂/(√v̂ + ε) = −lr·g/(|g| + ε) (λw = 0)."""
    rng = np.random.default_rng(7)
    g1, g2 = rng.normal(size=KERNEL_SHAPE), rng.normal(size=KERNEL_SHAPE)
    var = tf.Variable(tf.zeros(KERNEL_SHAPE, tf.float64), name="dense/kernel")
    opt = LAMB(**HP)
    assert opt.uses_weight_decay(var) and opt.uses_adaptation(var)
    lr, eps = HP["learning_rate"], HP["epsilon"]
    opt.apply_gradients([(tf.constant(g1), var)])
    np.testing.assert_allclose(var.numpy(), -lr * g1 / (np.abs(g1) + eps), rtol=1e-12)
    assert opt.trust_ratios() == {var.name: 1.0}
    # The second step, from these nonzero weights, is adapted and matches the reference.
    opt.apply_gradients([(tf.constant(g2), var)])
    hp = {k: v for k, v in HP.items() if k != "learning_rate"}
    want, _, _, trusts = reference(np.zeros(KERNEL_SHAPE), [g1, g2], lrs=[lr, lr], **hp)
    np.testing.assert_allclose(var.numpy(), want, rtol=1e-12)
    assert trusts[0] == 1.0 and abs(trusts[1] - 1.0) > 0.1
    assert opt.trust_ratios()[var.name] == pytest.approx(trusts[1], rel=1e-12)


def test_zero_update_gives_unit_ratio():
    """g = 0 and no weight decay: r = 0, so trust = 1 (no NaN) and w does not move."""
    rng = np.random.default_rng(8)
    w0 = rng.normal(size=KERNEL_SHAPE)
    var = tf.Variable(w0, name="dense/kernel")
    opt = LAMB(**{**HP, "weight_decay": 0.0})
    opt.apply_gradients([(tf.zeros(KERNEL_SHAPE, tf.float64), var)])
    np.testing.assert_array_equal(var.numpy(), w0)
    assert opt.trust_ratios() == {var.name: 1.0}


def test_zero_gradient_with_weight_decay_shrinks_by_lr():
    """g = 0, λ > 0: r = λw, trust = ‖w‖/(λ‖w‖) = 1/λ, so w ← w − lr·w = (1 − lr)·w, for any λ."""
    rng = np.random.default_rng(9)
    w0 = rng.normal(size=KERNEL_SHAPE)
    var = tf.Variable(w0, name="dense/kernel")
    opt = LAMB(**HP)
    opt.apply_gradients([(tf.zeros(KERNEL_SHAPE, tf.float64), var)])
    np.testing.assert_allclose(var.numpy(), (1 - HP["learning_rate"]) * w0, rtol=1e-12)
    assert opt.trust_ratios()[var.name] == pytest.approx(1 / HP["weight_decay"], rel=1e-12)


# ---- trust ratios -------------------------------------------------------------------------------
@pytest.mark.parametrize("exclusions", ["default", "none", "regex"])
def test_trust_ratios_equal_the_reference(exclusions):
    kwargs, flags = EXCLUSIONS[exclusions]
    init, grads = make_data(seed=10)
    variables = make_vars(init, tf.float64)
    opt = LAMB(**HP, **kwargs)
    assert opt.trust_ratios() == {}  # no variable seen yet
    want = expected(init, grads, flags)
    names = list(variables)
    for step, g in enumerate(grads):
        opt.apply_gradients(zip([tf.constant(g[n]) for n in names], variables.values()))
        got, every = opt.trust_ratios(), opt.trust_ratios(include_excluded=True)
        adapted = [n for n in names if flags[n][1]]
        assert sorted(got) == sorted(variables[n].name for n in adapted)
        assert sorted(every) == sorted(v.name for v in variables.values())
        for n in names:
            trust = want[n][3][step]
            assert every[variables[n].name] == pytest.approx(trust, rel=1e-12), (n, step)
            if flags[n][1]:
                assert got[variables[n].name] == pytest.approx(trust, rel=1e-12)
                assert abs(trust - 1.0) > 0.05  # a real ratio, not the fallback
            else:
                assert trust == 1.0


# ---- argument validation ------------------------------------------------------------------------
@pytest.mark.parametrize("arg,bad", [("learning_rate", -0.1), ("beta_1", -0.1), ("beta_1", 1.0),
                                     ("beta_2", -1e-3), ("beta_2", 1.0), ("epsilon", -1e-9),
                                     ("epsilon", 0.0), ("weight_decay", -0.01),
                                     ("weight_decay", float("nan"))])
def test_out_of_range_hyperparameters_raise(arg, bad):
    with pytest.raises(ValueError, match=arg):
        LAMB(**{arg: bad})


@pytest.mark.parametrize("arg", ["learning_rate", "beta_1", "beta_2", "weight_decay"])
def test_zero_hyperparameters_are_allowed(arg):
    assert getattr(LAMB(**{arg: 0.0}), arg) == 0.0


@pytest.mark.parametrize("which", ["exclude_from_weight_decay", "exclude_from_layer_adaptation"])
@pytest.mark.parametrize("patterns", [["(unclosed"], [RANK_LE_1, "bad[regex"], ["@rank<=2"]])
def test_bad_exclusion_patterns_raise(which, patterns):
    with pytest.raises(ValueError):
        LAMB(**{which: patterns})


def test_no_weight_decay_at_all():
    kernel = tf.Variable(tf.zeros((2, 3)), name="fc/kernel")
    assert LAMB().uses_weight_decay(kernel)
    assert not LAMB(weight_decay=0.0).uses_weight_decay(kernel)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_half_precision_variables_are_rejected(dtype):
    var = tf.Variable(tf.ones((2, 3), dtype), name="fc/kernel")
    before = var.numpy().copy()
    with pytest.raises(TypeError, match=f"{dtype.name}.*float32"):
        LAMB().apply_gradients([(tf.ones((2, 3), dtype), var)])
    np.testing.assert_array_equal(var.numpy(), before)


# ---- config -------------------------------------------------------------------------------------
CTOR_ARGS = ("learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay",
             "exclude_from_weight_decay", "exclude_from_layer_adaptation", "name")


def _custom_opt(learning_rate):
    return LAMB(learning_rate=learning_rate, beta_1=0.85, beta_2=0.98, epsilon=1e-8,
                weight_decay=5e-4, exclude_from_weight_decay=[RANK_LE_1, "head"],
                exclude_from_layer_adaptation=["bn"], name="MyLAMB", clipnorm=2.0)


def test_get_config_has_every_constructor_argument():
    config = _custom_opt(0.25).get_config()
    assert set(CTOR_ARGS) <= set(config)
    assert config["learning_rate"] == pytest.approx(0.25)
    assert (config["beta_1"], config["beta_2"], config["epsilon"]) == (0.85, 0.98, 1e-8)
    assert config["weight_decay"] == 5e-4 and config["name"] == "MyLAMB"
    assert config["exclude_from_weight_decay"] == [RANK_LE_1, "head"]
    assert config["exclude_from_layer_adaptation"] == ["bn"]
    assert config["clipnorm"] == 2.0
    # Defaults are explicit too.
    default = LAMB().get_config()
    assert default["exclude_from_weight_decay"] == [RANK_LE_1]
    assert default["exclude_from_layer_adaptation"] == [RANK_LE_1]
    assert (default["beta_1"], default["beta_2"], default["epsilon"]) == (0.9, 0.999, 1e-6)
    assert default["weight_decay"] == 0.01 and default["name"] == "LAMB"


@pytest.mark.parametrize("schedule", [False, True])
def test_from_config_round_trip(schedule):
    lr = (WarmupPolyDecay(peak_lr=3.0, total_steps=100, warmup_steps=10, decay_over="global")
          if schedule else 0.25)
    opt = _custom_opt(lr)
    config = opt.get_config()
    rebuilt = LAMB.from_config(copy.deepcopy(config))
    assert type(rebuilt) is LAMB
    assert rebuilt.get_config() == config
    for attr in ("beta_1", "beta_2", "epsilon", "weight_decay", "exclude_from_weight_decay",
                 "exclude_from_layer_adaptation", "clipnorm"):
        assert getattr(rebuilt, attr) == getattr(opt, attr), attr
    # Through Keras' own (de)serialization too, as a saved model's optimizer would be.
    blob = tf.keras.optimizers.serialize(opt)
    assert blob["registered_name"] == "knl_train>LAMB"
    again = tf.keras.optimizers.deserialize(copy.deepcopy(blob), use_legacy_optimizer=True)
    assert type(again) is LAMB and again.get_config() == config
    if schedule:
        assert isinstance(config["learning_rate"], dict)
        for new in (rebuilt, again):
            new_lr = new._get_hyper("learning_rate")
            assert isinstance(new_lr, WarmupPolyDecay)
            assert new_lr.get_config() == lr.get_config()


# ---- Horovod ------------------------------------------------------------------------------------
@pytest.mark.parametrize("exclusions", ["default", "regex", "additive"])
def test_exclusions_survive_horovod_wrapping(hvd, exclusions):
    kwargs, flags = EXCLUSIONS[exclusions]
    opt = LAMB(**HP, **kwargs)
    wrapped = hvd.DistributedOptimizer(opt)
    assert wrapped is not opt and isinstance(wrapped, LAMB)
    base, cfg = opt.get_config(), wrapped.get_config()
    for key in CTOR_ARGS:
        if key != "name":  # Horovod renames it DistributedLAMB
            assert cfg[key] == base[key], key
    init, grads = make_data(seed=11)
    variables = make_vars(init, tf.float64)
    assert variables["bias"].shape.rank == 1 and variables["kernel"].shape.rank == 2
    for n, var in variables.items():
        assert wrapped.uses_weight_decay(var) == flags[n][0], n
        assert wrapped.uses_adaptation(var) == flags[n][1], n
    # A single-rank allreduce is the identity, so the wrapped update is the reference's.
    run_optimizer(wrapped, variables, grads, tf.float64)
    check_against(wrapped, variables, expected(init, grads, flags), rtol=1e-12, atol=1e-14)
    assert wrapped.trust_ratios(include_excluded=True).keys() == {
        v.name for v in variables.values()}


def test_keras_fit_with_horovod_wrapper(hvd):
    """The trainer's path: model.compile(hvd.DistributedOptimizer(LAMB)), then fit."""
    tf.keras.utils.set_random_seed(12)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, name="fc")])
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    bias.assign([0.5, -0.25, 1.0])
    k0, b0 = kernel.numpy().copy(), bias.numpy().copy()
    lr = 0.0625
    model.compile(optimizer=hvd.DistributedOptimizer(LAMB(lr)), loss="mse")
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # one step
    opt = model.optimizer
    assert int(opt.iterations.numpy()) == 1
    # Adapted kernel: the step lr·trust·r has norm lr·‖w‖, whatever the gradient.
    np.testing.assert_allclose(np.linalg.norm(kernel.numpy() - k0), lr * np.linalg.norm(k0),
                               rtol=1e-5)
    # Excluded bias, first step: −lr·m̂/(√v̂ + ε) = −lr·g/(|g| + ε), i.e. lr per entry.
    np.testing.assert_allclose(np.abs(bias.numpy() - b0), lr, rtol=1e-4)
    ratios = opt.trust_ratios(include_excluded=True)
    assert set(ratios) == {kernel.name, bias.name}
    assert ratios[bias.name] == 1.0 and ratios[kernel.name] > 0 and ratios[kernel.name] != 1.0


# ---- state --------------------------------------------------------------------------------------
def test_checkpoint_holds_slots_not_the_work_buffer(tmp_path):
    """m, v and the trust ratio are checkpointed (a resumed run continues exactly); r's work
    buffer is not, nor is it among the optimizer's variables."""
    kwargs, flags = EXCLUSIONS["none"]
    init, grads = make_data(seed=13)
    variables = make_vars(init, tf.float64)
    opt = LAMB(**HP, **kwargs)
    run_optimizer(opt, variables, grads[:2], tf.float64)
    path = tf.train.Checkpoint(optimizer=opt, **variables).save(str(tmp_path / "ckpt"))
    names = [n for n, _ in tf.train.list_variables(path)]
    for slot in ("m", "v", "trust_ratio"):
        assert sum(f"/{slot}/" in n for n in names) == 2, (slot, names)
    assert not any("lamb_r" in n for n in names)
    assert not any("lamb_r" in v.name for v in opt.variables())

    fresh_vars = make_vars({n: np.zeros_like(a) for n, a in init.items()}, tf.float64)
    fresh = LAMB(**HP, **kwargs)
    tf.train.Checkpoint(optimizer=fresh, **fresh_vars).restore(path)
    run_optimizer(fresh, fresh_vars, grads[2:], tf.float64)
    check_against(fresh, fresh_vars, expected(init, grads, flags), rtol=1e-12, atol=1e-14)


# ---- sparse gradients ---------------------------------------------------------------------------
def test_sparse_gradient_raises_with_clear_message():
    table = tf.Variable(np.random.default_rng(14).normal(size=(10, 4)),
                        name="embedding/embeddings")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, [1, 3, 3]) ** 2)
    grad = tape.gradient(loss, table)
    assert isinstance(grad, tf.IndexedSlices)
    opt = LAMB(exclude_from_weight_decay=[], exclude_from_layer_adaptation=[])
    before = table.numpy().copy()
    with pytest.raises(NotImplementedError, match=r"IndexedSlices.*sparse_as_dense=True.*"
                                                  r"tf\.convert_to_tensor"):
        opt.apply_gradients([(grad, table)])
    np.testing.assert_array_equal(table.numpy(), before)
    # The suggested fix works: the densified gradient goes through the dense path.
    opt.apply_gradients([(tf.convert_to_tensor(grad), table)])
    assert not np.array_equal(table.numpy(), before)
