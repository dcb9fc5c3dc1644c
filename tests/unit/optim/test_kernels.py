"""The fused LARS op and its loader (knl_train/optim/kernels): which path a run takes, how it
says so, and the op's own properties (bfloat16 arithmetic, determinism, copy-on-write).
Numerical agreement of both paths with the reference is in test_lars.py."""

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


def op_types(opt, variables, grads):
    """Op types of one traced apply_gradients step."""
    @tf.function
    def step():
        opt.apply_gradients(zip(grads, variables))
    return {op.type for op in step.get_concrete_function().graph.get_operations()}


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
    assert "KnlLarsApply" not in types and "ResourceApplyKerasMomentum" in types
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
    assert "KnlLarsApply" not in op_types(opt, [var], [tf.ones((4, 3))])
    assert np.all(np.isfinite(var.numpy())) and not np.allclose(var.numpy(), 1.0)


def test_only_rank_zero_reports_the_fallback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(kernels.DIR_ENV_VAR, str(tmp_path))
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert kernels.lars_op(tf.float32) is None
    assert capsys.readouterr().err.strip() == ""


def test_auto_uses_the_op_when_built(built, capsys):
    var = kernel_var()
    types = op_types(LARS(**HP), [var], [tf.ones((4, 3))])
    assert "KnlLarsApply" in types and "ResourceApplyKerasMomentum" not in types
    # Not for float16 (the op has no half kernel) nor under XLA (no custom ops): pure TF.
    half = kernel_var(tf.float16, "half/kernel")
    assert "KnlLarsApply" not in op_types(LARS(**HP), [half], [tf.ones((4, 3), tf.float16)])
    xla_var = kernel_var()
    opt = LARS(**HP)

    @tf.function(jit_compile=True)
    def xla_step():
        opt.apply_gradients([(tf.ones((4, 3)), xla_var)])
    xla_step()
    assert np.all(np.isfinite(xla_var.numpy()))
    assert capsys.readouterr().err == ""


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
    ragged tail; returns the bytes of the weights, the momentum slot and the trust ratio."""
    rng = np.random.default_rng(seed)
    shape = ((blocks * 16384 + 1234) // 2, 2)
    w = tf.Variable(tf.constant(rng.normal(size=shape), dtype), name="big/kernel")
    opt = LARS(**HP, variant="model_garden", nesterov=True)
    for k in range(3):
        g = tf.constant(rng.normal(size=shape) * (k + 1), dtype)
        opt.apply_gradients([(g, w)])
    return (w.numpy().tobytes(), opt.get_slot(w, "momentum").numpy().tobytes(),
            opt.get_slot(w, "trust_ratio").numpy().tobytes())


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
