"""The fused LARS ops and their loader (knl_train/optim/kernels): which path a run takes, how it
says so, and the ops' own properties (bfloat16 arithmetic, determinism, copy-on-write, the
multi-variable op equal to the one-variable op bit for bit). Numerical agreement of both paths
with the reference is in test_lars.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from knl_train.errors import UserError
from knl_train.optim import LARS, kernels
from tests.support import ROOT

HP = dict(learning_rate=0.75, momentum=0.875, weight_decay=0.05, trust_coefficient=0.02,
          epsilon=0.3)
FUSED_OPS = {"KnlLarsApply", "KnlLarsApplyMulti"}


@pytest.fixture(autouse=True)
def clean_loader(monkeypatch):
    """Every test starts from the default mode and the environment's kernel directory, and
    leaves no cached check or printed-message memory behind."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.delenv(kernels.DIR_ENV_VAR, raising=False)
    kernels.reset()
    yield
    kernels.reset()


@pytest.fixture
def built():
    """The op's library for this TF; skips (with the reason) when 'make env' did not build it."""
    info = kernels.status()
    if not info["fused"]:
        pytest.skip(f"fused LARS op unavailable: {info['reason']}; run 'make env'")
    return kernels.library_path()


def op_list(opt, variables, grads):
    """Op types of one traced apply_gradients step, one entry per op."""
    @tf.function
    def step():
        opt.apply_gradients(zip(grads, variables))
    return [op.type for op in step.get_concrete_function().graph.get_operations()]


def op_types(opt, variables, grads):
    return set(op_list(opt, variables, grads))


def kernel_var(dtype=tf.float32, name="dense/kernel"):
    return tf.Variable(tf.ones((4, 3), dtype), name=name)


# ---- mode and fallback ------------------------------------------------------------------------
def test_mode_parsing(monkeypatch):
    assert kernels.mode({}) == "auto"
    assert kernels.mode({kernels.ENV_VAR: " Fused "}) == "fused"
    assert kernels.mode({kernels.ENV_VAR: ""}) == "auto"
    with pytest.raises(UserError, match="auto, fused, tf"):
        kernels.mode({kernels.ENV_VAR: "yes"})
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(UserError, match=kernels.ENV_VAR):
        kernels.lars_op()


def test_library_is_per_environment_and_tf_version():
    path = kernels.library_path()
    assert path.name == f"lars_fused-tf{tf.__version__}.so"
    assert path.parent == kernels.kernel_dir()
    assert str(path).startswith(sys.prefix)


def test_forced_tf_path_uses_no_custom_op(monkeypatch, capsys):
    monkeypatch.setenv(kernels.ENV_VAR, "tf")
    assert kernels.lars_op(tf.float32) is None
    var = kernel_var()
    types = op_types(LARS(**HP), [var], [tf.ones((4, 3))])
    assert not types & FUSED_OPS and "ResourceApplyKerasMomentum" in types
    assert capsys.readouterr().err == ""  # a deliberate choice is not announced


def test_fused_requested_but_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.DIR_ENV_VAR, str(tmp_path))
    monkeypatch.setenv(kernels.ENV_VAR, "fused")
    missing = tmp_path / f"lars_fused-tf{tf.__version__}.so"
    with pytest.raises(UserError) as err:
        kernels.lars_op(tf.float32)
    assert str(missing) in str(err.value) and "make env" in str(err.value)
    # The optimizer surfaces the same error instead of silently running the slow path.
    with pytest.raises(UserError, match="make env"):
        LARS(**HP).apply_gradients([(tf.ones((4, 3)), kernel_var())])


def test_auto_falls_back_and_says_so_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(kernels.DIR_ENV_VAR, str(tmp_path))
    missing = tmp_path / f"lars_fused-tf{tf.__version__}.so"
    var = kernel_var()
    opt = LARS(**HP)
    for _ in range(3):
        opt.apply_gradients([(tf.ones((4, 3)), var)])
    assert kernels.lars_op(tf.float32) is None
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert str(missing) in lines[0] and "make env" in lines[0] and "pure-TF" in lines[0]
    assert not op_types(opt, [var], [tf.ones((4, 3))]) & FUSED_OPS
    assert np.all(np.isfinite(var.numpy())) and not np.allclose(var.numpy(), 1.0)


def test_only_rank_zero_reports_the_fallback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(kernels.DIR_ENV_VAR, str(tmp_path))
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert kernels.lars_op(tf.float32) is None
    assert capsys.readouterr().err.strip() == ""


def test_auto_uses_the_op_when_built(built, capsys):
    var = kernel_var()
    types = op_types(LARS(**HP), [var], [tf.ones((4, 3))])
    assert "KnlLarsApplyMulti" in types
    assert not types & {"KnlLarsApply", "ResourceApplyKerasMomentum"}
    # Not for float16 (the op has no half kernel) nor under XLA (no custom ops): pure TF.
    half = kernel_var(tf.float16, "half/kernel")
    assert not op_types(LARS(**HP), [half], [tf.ones((4, 3), tf.float16)]) & FUSED_OPS
    xla_var = kernel_var()
    opt = LARS(**HP)

    @tf.function(jit_compile=True)
    def xla_step():
        opt.apply_gradients([(tf.ones((4, 3)), xla_var)])
    xla_step()
    assert np.all(np.isfinite(xla_var.numpy()))
    assert capsys.readouterr().err == ""


def test_one_multi_op_per_dtype_per_step(built):
    """Variables of three dtypes in one step: one KnlLarsApplyMulti each, no per-variable op and
    no trust-ratio assignment (the op writes the slots). A float16 variable, which no kernel
    takes, sends the whole step down the per-variable path: the one-variable op where it can,
    pure TF for the float16 variable."""
    dtypes = (tf.float32, tf.float64, tf.bfloat16, tf.float32)
    variables = [kernel_var(d, f"layer{k}/kernel") for k, d in enumerate(dtypes)]
    variables.append(tf.Variable(tf.ones(3), name="layer0/bias"))  # excluded: rank 1
    grads = [tf.ones(v.shape, v.dtype) for v in variables]
    ops = op_list(LARS(**HP), variables, grads)
    assert ops.count("KnlLarsApplyMulti") == 3 and ops.count("AssignAddVariableOp") == 1
    assert not set(ops) & {"KnlLarsApply", "AssignVariableOp", "ResourceApplyKerasMomentum"}

    half = kernel_var(tf.float16, "half/kernel")
    ops = op_list(LARS(**HP), variables + [half], grads + [tf.ones((4, 3), tf.float16)])
    assert "KnlLarsApplyMulti" not in ops and ops.count("KnlLarsApply") == len(variables)
    assert ops.count("ResourceApplyKerasMomentum") == 1


def _copy_library(src, dst_dir, **record_changes):
    dst = dst_dir / src.name
    shutil.copy2(src, dst)
    record = json.loads(kernels.sidecar_path(src).read_text())
    record.update(record_changes)
    kernels.sidecar_path(dst).write_text(json.dumps(record))
    return dst


@pytest.mark.parametrize("change, phrase", [
    ({"source_sha256": "0" * 64}, "stale"),
    ({"cpu_flags_required": ["avx2", "no_such_cpu_feature"]}, "no_such_cpu_feature"),
])
def test_unusable_library_is_refused(built, monkeypatch, tmp_path, capsys, change, phrase):
    """A library from another lars_fused.cc, or for a CPU this one is not, is never loaded:
    auto falls back (saying why), fused refuses."""
    copy = _copy_library(built, tmp_path, **change)
    monkeypatch.setenv(kernels.DIR_ENV_VAR, str(tmp_path))
    assert kernels.lars_op(tf.float32) is None
    err = capsys.readouterr().err
    assert phrase in err and str(copy) in err
    monkeypatch.setenv(kernels.ENV_VAR, "fused")
    with pytest.raises(UserError, match=phrase):
        kernels.lars_op(tf.float32)


def test_build_check_reports_state():
    proc = subprocess.run([sys.executable, "-m", "knl_train.optim.kernels.build", "--check"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == (0 if kernels.status()["fused"] else 1), proc.stdout + proc.stderr
    assert str(kernels.library_path()) in proc.stdout


# ---- the op itself ----------------------------------------------------------------------------
def bf16_round(x):
    """float32 -> bfloat16 -> float32, round to nearest even (finite inputs)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("variant", ["you", "tf_contrib", "model_garden"])
def test_bfloat16_step_is_float32_arithmetic_rounded_once(built, monkeypatch, variant):
    """bfloat16 weights: norms in double, update in float32, one rounding per stored value.
    The first step is emulated exactly in numpy (the squares of bfloat16 numbers sum exactly
    in double, so the summation order does not matter here)."""
    monkeypatch.setenv(kernels.ENV_VAR, "fused")
    rng = np.random.default_rng(11)
    w0 = bf16_round(rng.normal(size=(37, 29)))
    g = bf16_round(rng.normal(size=(37, 29)) * 0.5)
    var = tf.Variable(tf.constant(w0, tf.bfloat16), name="dense/kernel")
    opt = LARS(**HP, variant=variant)
    opt.apply_gradients([(tf.constant(g, tf.bfloat16), var)])

    lr, m = np.float32(HP["learning_rate"]), np.float32(HP["momentum"])
    beta, eta, eps = HP["weight_decay"], HP["trust_coefficient"], HP["epsilon"]
    w64, g64 = w0.astype(np.float64), g.astype(np.float64)
    gd32 = g + np.float32(beta) * w0  # g + βw formed in float32, as the op does
    w_norm = np.sqrt(np.sum(w64 * w64))
    if variant == "model_garden":
        t = eta * w_norm / (np.sqrt(np.sum(gd32.astype(np.float64) ** 2)) + eps)
    else:
        t = eta * w_norm / (np.sqrt(np.sum(g64 * g64)) + beta * w_norm + eps)
    s = np.float32(np.float64(lr) * t)
    if variant == "tf_contrib":
        v = np.float32(0) * m + g
        want_w, want_v = bf16_round(w0 - v * s), bf16_round(v)
    else:
        u = np.float32(0) * m - gd32 * s
        want_w, want_v = bf16_round(w0 + u), bf16_round(u)
    got_w = tf.cast(var, tf.float32).numpy()
    got_v = tf.cast(opt.get_slot(var, "momentum"), tf.float32).numpy()
    assert float(opt.get_slot(var, "trust_ratio")) == pytest.approx(t, rel=1e-2)
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_v, want_v)
    # Further steps stay within bfloat16 resolution of the float64 trajectory.
    for _ in range(3):
        opt.apply_gradients([(tf.constant(g, tf.bfloat16), var)])
    assert np.all(np.isfinite(tf.cast(var, tf.float32).numpy()))


def _big_step(dtype, blocks=3, seed=21):
    """Three steps on a variable spanning several kernel blocks (16384 elements) plus a
    ragged tail, and a small one beside it in the same op; returns the bytes of the weights,
    the momentum slots and the trust ratios."""
    rng = np.random.default_rng(seed)
    shapes = {"big/kernel": ((blocks * 16384 + 1234) // 2, 2), "small/kernel": (3, 3, 5)}
    ws = [tf.Variable(tf.constant(rng.normal(size=shape), dtype), name=name)
          for name, shape in shapes.items()]
    opt = LARS(**HP, variant="model_garden", nesterov=True)
    for k in range(3):
        opt.apply_gradients([(tf.constant(rng.normal(size=w.shape) * (k + 1), dtype), w)
                             for w in ws])
    return tuple(x.numpy().tobytes() for w in ws for x in (
        w, opt.get_slot(w, "momentum"), opt.get_slot(w, "trust_ratio")))


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_fused_step_is_deterministic(built, monkeypatch, dtype):
    monkeypatch.setenv(kernels.ENV_VAR, "fused")
    assert _big_step(dtype) == _big_step(dtype)


# Run with cwd=ROOT: ``python -c`` puts the working directory on sys.path, so the child imports
# _big_step from this module by name.
DETERMINISM_SCRIPT = """
import hashlib, sys
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
from tests.unit.optim.test_kernels import _big_step
print(hashlib.sha256(b"".join(_big_step(tf.float32, blocks=24))).hexdigest())
"""


def test_fused_norms_do_not_depend_on_the_thread_count(built):
    """Ranks may run with different intra-op pools; the fixed-block reduction keeps the bits.
    24 blocks are enough work for TF's pool to shard them across threads."""
    env = {**os.environ, kernels.ENV_VAR: "fused", "TF_CPP_MIN_LOG_LEVEL": "3"}
    digests = set()
    for threads in (1, 3):
        proc = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, str(threads)],
                              capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


def test_update_copies_a_buffer_still_being_read(built, monkeypatch):
    """Copy-on-write like TF's own training ops: a value read before the step keeps its
    contents after the op updates the variable."""
    monkeypatch.setenv(kernels.ENV_VAR, "fused")
    var = kernel_var(tf.float64)
    before = var.read_value()
    snapshot = before.numpy().copy()
    LARS(**HP).apply_gradients([(tf.ones((4, 3), tf.float64), var)])
    np.testing.assert_array_equal(before.numpy(), snapshot)
    assert not np.array_equal(var.numpy(), snapshot)


def test_op_checks_its_inputs(built):
    op = tf.load_op_library(str(built))
    var, accum = tf.Variable(tf.ones((4, 3))), tf.Variable(tf.zeros((4, 3)))
    one = tf.constant(1.0, tf.float64)

    def apply(**changes):
        args = dict(var=var.handle, accum=accum.handle, lr=one, momentum=one,
                    grad=tf.ones((4, 3)), weight_decay=one, trust_coefficient=one, epsilon=one,
                    lars_variant="you")
        return op.knl_lars_apply(**{**args, **changes})

    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="shape"):
        apply(grad=tf.ones((3, 4)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="lr must be a scalar"):
        apply(lr=tf.constant([1.0, 2.0], tf.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one variable"):
        apply(accum=var.handle)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dtype"):
        apply(var=tf.Variable(tf.ones((4, 3), tf.float64)).handle)
    np.testing.assert_array_equal(var.numpy(), np.ones((4, 3)))
    np.testing.assert_array_equal(accum.numpy(), np.zeros((4, 3)))
    assert apply().dtype == tf.float32  # t comes back in the variable's dtype, as its slot


# ---- the multi-variable op ----------------------------------------------------------------------
# name: (shape, adapted, weight decay); several blocks, a ragged tail, exclusions both ways,
# ‖w‖ = 0 (t = 1) and an empty variable.
MULTI_VARS = {
    "conv/kernel": ((3, 3, 3, 8), True, True),
    "bn/gamma": ((8,), False, False),
    "big/kernel": ((2 * 16384 + 77,), True, True),
    "head/kernel": ((5, 7), True, False),
    "head/bias": ((7,), False, True),
    "zero/kernel": ((4, 4), True, True),
    "empty/kernel": ((0, 3), True, True),
}


def _scalars(**hp):
    f64 = lambda x: tf.constant(x, tf.float64)  # noqa: E731
    return dict(lr=f64(hp["learning_rate"]), momentum=f64(hp["momentum"]),
                trust_coefficient=f64(hp["trust_coefficient"]), epsilon=f64(hp["epsilon"]))


def _fresh(dtype, seed=31):
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, _, _) in MULTI_VARS.items():
        w = np.zeros(shape) if name.startswith("zero") else rng.normal(size=shape)
        out[name] = (tf.Variable(tf.constant(w, dtype)), tf.Variable(tf.zeros(shape, dtype)),
                     tf.Variable(tf.constant(0.0, dtype)))
    return out


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.bfloat16])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("variant", ["you", "tf_contrib", "model_garden"])
def test_multi_op_equals_the_single_op_bit_for_bit(built, variant, nesterov, dtype):
    """Three steps of KnlLarsApplyMulti over all of MULTI_VARS against KnlLarsApply on each:
    the same weights, momentum slots and trust ratios, bit for bit; the multi op writes the
    adapted variables' ratios to their slots and leaves the excluded ones' alone."""
    op = tf.load_op_library(str(built))
    single, multi = _fresh(dtype), _fresh(dtype)
    flags = list(MULTI_VARS.values())
    rng = np.random.default_rng(32)
    beta = tf.constant(HP["weight_decay"], tf.float64)
    for step in range(3):
        grads = [tf.constant(rng.normal(size=shape) * (step + 1), dtype) for shape, _, _ in flags]
        want = [op.knl_lars_apply(var=w.handle, accum=v.handle, grad=g, adapt=adapt,
                                  weight_decay=beta if decay else tf.constant(0.0, tf.float64),
                                  lars_variant=variant, nesterov=nesterov, **_scalars(**HP))
                for (w, v, _), g, (_, adapt, decay) in zip(single.values(), grads, flags)]
        got = op.knl_lars_apply_multi(
            vars=[w.handle for w, _, _ in multi.values()],
            accums=[v.handle for _, v, _ in multi.values()],
            trust_ratio_slots=[t.handle for (_, _, t), (_, adapt, _) in zip(multi.values(), flags)
                               if adapt],
            grads=grads, weight_decay=beta, lars_variant=variant, nesterov=nesterov,
            adapt=[a for _, a, _ in flags], use_weight_decay=[d for _, _, d in flags],
            **_scalars(**HP))
        assert got.dtype == dtype and got.shape == (len(flags),)
        assert got.numpy().tobytes() == b"".join(t.numpy().tobytes() for t in want)
        if step == 0:
            first = got
    for name, (shape, adapt, _) in MULTI_VARS.items():
        (w1, v1, _), (w2, v2, t2) = single[name], multi[name]
        assert w1.numpy().tobytes() == w2.numpy().tobytes(), name
        assert v1.numpy().tobytes() == v2.numpy().tobytes(), name
        k = list(MULTI_VARS).index(name)
        assert t2.numpy().tobytes() == (got[k].numpy().tobytes() if adapt else
                                        np.zeros((), t2.dtype.as_numpy_dtype).tobytes()), name
        # t = 1 without adaptation, for an empty variable, and while ‖w‖ = 0 (first step).
        unit = not adapt or name.startswith("empty")
        assert (float(got[k]) == 1.0) == unit, name
        assert (float(first[k]) == 1.0) == (unit or name.startswith("zero")), name


def test_multi_op_checks_its_inputs(built):
    """Every check runs before any write: a bad entry anywhere leaves all variables as they
    were, the earlier ones in the list included."""
    op = tf.load_op_library(str(built))
    kernel, bias = tf.Variable(tf.ones((4, 3))), tf.Variable(tf.ones(3))
    m_kernel, m_bias = tf.Variable(tf.zeros((4, 3))), tf.Variable(tf.zeros(3))
    slot = tf.Variable(0.0)
    one = tf.constant(1.0, tf.float64)

    def apply(**changes):
        args = dict(vars=[kernel.handle, bias.handle], accums=[m_kernel.handle, m_bias.handle],
                    trust_ratio_slots=[slot.handle], grads=[tf.ones((4, 3)), tf.ones(3)],
                    lr=one, momentum=one, weight_decay=one, trust_coefficient=one, epsilon=one,
                    lars_variant="you", adapt=[True, False], use_weight_decay=[True, False])
        return op.knl_lars_apply_multi(**{**args, **changes})

    bad = [
        (dict(grads=[tf.ones((4, 3)), tf.ones(4)]), "shape"),
        (dict(accums=[m_kernel.handle, kernel.handle]),
         r"vars\[0\] and accums\[1\] are one variable"),
        (dict(trust_ratio_slots=[m_bias.handle]), "one variable"),
        (dict(adapt=[True, True]), "2 adapted, 1 slots"),
        (dict(use_weight_decay=[True]), "one entry per variable"),
        (dict(trust_ratio_slots=[tf.Variable(tf.zeros(2)).handle]), "must be a scalar"),
        (dict(vars=[kernel.handle, tf.Variable(tf.ones(3, tf.float64)).handle]), "dtype"),
        (dict(epsilon=tf.constant([1.0], tf.float64)), "epsilon must be a scalar"),
    ]
    for changes, message in bad:
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
            apply(**changes)
    for var, value in ((kernel, 1.0), (bias, 1.0), (m_kernel, 0.0), (m_bias, 0.0), (slot, 0.0)):
        np.testing.assert_array_equal(var.numpy(), np.full(var.shape, value))
    t = apply()
    assert t.dtype == tf.float32 and t.shape == (2,) and float(t[1]) == 1.0
    assert float(slot.numpy()) == float(t[0]) != 0.0
