"""Thin Horovod helpers for the trainer: init, wrapping (only), broadcast and small reductions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd

from knl_train.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    controller: str

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def init() -> World:
    hvd.init()
    controller = "gloo" if hvd_tf.gloo_enabled() else "mpi" if hvd_tf.mpi_enabled() else "unknown"
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), controller)


def distributed_optimizer(optimizer, backward_passes_per_step: int = 1, compression: str = "none"):
    """Wrap so that gradients are averaged across ranks before the optimizer sees them.

    LARS computes its trust ratios inside ``_resource_apply_dense``, after the allreduce, so
    all ranks apply identical updates. The wrapper changes nothing else: with gradient
    accumulation the optimizer's schedules must already count optimizer updates, not
    micro-batches (``knl_train.optim.schedules.per_update``, which ``train.setup`` applies).
    """
    k = int(backward_passes_per_step)
    if k < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {k}")
    codecs = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
    if compression not in codecs:
        raise ValueError(f"compression must be one of {', '.join(codecs)}, got {compression!r}")
    wrapped = hvd.DistributedOptimizer(optimizer, backward_passes_per_step=k,
                                       average_aggregated_gradients=True,
                                       compression=codecs[compression])
    _plain_allreduce(wrapped)
    return wrapped


class _WaitClock:
    """Seconds this rank spent in the gradient allreduce, from its last gradient being ready to
    the reduced gradients (a plain holder: Keras's checkpoint tracking does not look inside)."""

    def __init__(self):
        self.seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="allreduce_wait")


def allreduce_wait_clock(optimizer) -> Optional[Callable[[], float]]:
    """The seconds ``optimizer`` (from ``distributed_optimizer``) has waited in its gradient
    allreduces so far, as a function: the straggler measure's "not busy" part. None when not
    measured (op determinism forbids reading the clock in a graph)."""
    clock = getattr(optimizer, "_knl_wait_clock", None)
    return None if clock is None else (lambda: float(clock.seconds.numpy()))


def _plain_allreduce(wrapped) -> None:
    """Trace Horovod's gradient allreduce without AutoGraph, and time it.

    Horovod builds it as a ``tf.function`` of its own, AutoGraph on, and AutoGraph's
    source-to-source conversion of it was a second of every run's first step; the function
    branches on Python values only, so plain tracing builds the same graph. The two attributes
    are Horovod 0.28's; if they are not there, nothing changes but the start-up time (and no
    wait is measured).

    The wait: in lock-step every rank's step takes the same wall time, the fast ranks spending
    the difference waiting here for the slow one's gradients, so a step's wall time less this
    wait is the rank's busy time (``knl_train.dist.guard`` gathers it at the agreements).
    """
    fn = getattr(wrapped, "_allreduce_grads", None)
    if not hasattr(fn, "python_function"):
        return
    reduce_grads = fn.python_function
    if _op_determinism():  # tf.timestamp is refused there
        _replace_allreduce(wrapped, fn, tf.function(reduce_grads, autograph=False))
        return
    clock = wrapped._knl_wait_clock = _WaitClock()

    def timed(grads, variables):
        with tf.control_dependencies(_tensors(grads)):
            began = tf.timestamp()  # once this rank's last gradient is ready
        reduced = reduce_grads(grads, variables)
        with tf.control_dependencies(_tensors(reduced)):
            # A stateful op: tf.function runs it, after every reduced gradient.
            clock.seconds.assign_add(tf.timestamp() - began)
        return reduced

    _replace_allreduce(wrapped, fn, tf.function(timed, autograph=False))


def _op_determinism() -> bool:
    """Whether op determinism is on (TF 2.15 does not export the check; unknown counts as on)."""
    from tensorflow.python.framework import config as tf_config
    check = getattr(tf_config, "is_op_determinism_enabled", None)
    return True if check is None else bool(check())


def _replace_allreduce(wrapped, fn, plain) -> None:
    wrapped._allreduce_grads = plain
    helper = getattr(wrapped, "_agg_helper", None)  # gradient accumulation keeps its own reference
    for attr in ("_allreduce_grads", "allreduce_grads"):  # graph and eager helpers name it so
        if helper is not None and getattr(helper, attr, None) is fn:
            setattr(helper, attr, plain)


def _tensors(grads) -> list:
    return [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]


def broadcast_from_root(variables) -> None:
    """Rank 0's values in ``variables`` on every rank: Horovod's grouped broadcast, traced as
    plain TensorFlow (Horovod's own ``broadcast_variables`` pays for AutoGraph at start-up)."""
    variables = list(variables)

    @tf.function(autograph=False)
    def broadcast():
        for v in variables:
            v.assign(hvd_tf.broadcast(v, root_rank=0))

    broadcast()


def broadcast_object(obj, name: str):
    """Rank 0's picklable ``obj`` on every rank."""
    return hvd_tf.broadcast_object(obj, root_rank=0, name=name)


def decided_by_root(world, decide: Callable[[], Any], name: str):
    """What ``decide()`` returns on rank 0, on every rank (the others do not call it); rank 0's
    ``UserError``, if it raises one, raised on every rank."""
    answer = None
    if world.is_root:
        try:
            answer = ("ok", decide())
        except UserError as e:
            answer = ("error", str(e))
    kind, value = broadcast_object(answer, name=name)
    if kind == "error":
        raise UserError(value)
    return value


def allgather(values, name: str) -> np.ndarray:
    """Every rank's small float vector, one row per rank (every rank calls this in order)."""
    values = np.asarray(values, dtype=np.float64).reshape(1, -1)
    if hvd_tf.size() == 1:
        return values
    return hvd_tf.allgather(tf.constant(values), name=name).numpy()


def allgather_object(obj, name: str) -> list:
    """Every rank's picklable ``obj``, by rank."""
    if hvd_tf.size() == 1:
        return [obj]
    return list(hvd_tf.allgather_object(obj, name=name))


def allreduce_sum(values, name: str) -> np.ndarray:
    """Sum a small float vector over all ranks (every rank must call this in the same order)."""
    return _allreduce(values, hvd_tf.Sum, name)


def allreduce_mean(values, name: str) -> np.ndarray:
    return _allreduce(values, hvd_tf.Average, name)


def allreduce_max(values, name: str) -> np.ndarray:
    return _allreduce(values, hvd_tf.Max, name)


def _allreduce(values, op, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if hvd_tf.size() == 1:  # a round trip through Horovod's cycle for nothing
        return values
    return hvd_tf.allreduce(tf.constant(values), op=op, name=name).numpy()


def average_non_trainable(model) -> None:
    """Average BN moving statistics (and other non-trainable state) over ranks, in place.

    Gradients are averaged, so trainable weights agree; BN moving means and variances are
    updated from each rank's own batches and drift apart. Averaging them before evaluation and
    checkpoints makes every rank hold, evaluate and save the same model.
    """
    variables = [v for v in model.non_trainable_variables if v.dtype.is_floating]
    if not variables or hvd.size() == 1:
        return
    averaged = hvd_tf.grouped_allreduce([v.value() for v in variables], op=hvd_tf.Average,
                                        name="knl_train.non_trainable")
    for v, a in zip(variables, averaged):
        v.assign(a)
