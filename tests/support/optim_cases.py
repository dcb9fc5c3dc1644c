"""Shared inputs for the optimizer reference tests: a rank-2 kernel and a rank-1 bias with
non-uniform values (all-ones inputs cannot tell some variants apart), and a runner."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

STEPS = 4
KERNEL_SHAPE, BIAS_SHAPE = (5, 3), (3,)


def make_data(seed=0, steps=STEPS, kernel_scale=0.8, bias_scale=0.3, bias_shift=0.1):
    """Initial weights and a fixed gradient sequence, as float64 numpy arrays."""
    rng = np.random.default_rng(seed)
    init = {"kernel": rng.normal(size=KERNEL_SHAPE) * kernel_scale,
            "bias": rng.normal(size=BIAS_SHAPE) * bias_scale + bias_shift}
    grads = [{"kernel": rng.normal(size=KERNEL_SHAPE) * (0.5 + k),
              "bias": rng.normal(size=BIAS_SHAPE) * (1.5 - 0.3 * k)} for k in range(steps)]
    return init, grads


def make_vars(init, dtype):
    return {"kernel": tf.Variable(tf.constant(init["kernel"], dtype), name="dense/kernel"),
            "bias": tf.Variable(tf.constant(init["bias"], dtype), name="dense/bias")}


def run_optimizer(opt, variables, grads, dtype):
    """Apply the fixed gradient sequence eagerly; returns the final weights."""
    names = list(variables)
    for g in grads:
        opt.apply_gradients(zip([tf.constant(g[n], dtype) for n in names],
                                [variables[n] for n in names]))
    return {n: variables[n].numpy() for n in names}


def run_traced(opt, variables, grads, dtype, jit=False):
    """Apply the gradients through one ``tf.function``; returns (traces after the first step,
    traces at the end): equal when later steps reuse the graph."""
    names = list(variables)
    traced = []

    @tf.function(jit_compile=jit)
    def step(gs):
        traced.append(1)  # runs only while tracing
        opt.apply_gradients(zip(gs, [variables[n] for n in names]))

    first = None
    for k, g in enumerate(grads):
        step([tf.constant(g[n], dtype) for n in names])
        if k == 0:
            first = len(traced)  # the first call traces twice: it creates the slots
    return first, len(traced)
