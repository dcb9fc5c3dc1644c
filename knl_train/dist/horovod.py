"""Thin Horovod helpers for the trainer: init, wrapping, broadcast and small reductions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd


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


@tf.keras.utils.register_keras_serializable(package="knl_train")
class PerUpdateSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Evaluate ``schedule`` at the optimizer update, not the micro-batch.

    With ``backward_passes_per_step=k`` Horovod advances ``optimizer.iterations`` on every
    micro-batch and applies on the k-th, when ``iterations = k*n + k - 1`` for update n; so
    ``iterations // k`` is the update count the schedule was written for.
    """

    def __init__(self, schedule, passes: int):
        self.schedule = schedule
        self.passes = int(passes)

    def __call__(self, step):
        return self.schedule(tf.math.floordiv(tf.cast(step, tf.int64), self.passes))

    def get_config(self):
        return {"schedule": tf.keras.optimizers.schedules.serialize(self.schedule),
                "passes": self.passes}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from knl_train.optim.schedules import deserialize_schedules
        return cls(**deserialize_schedules(config, ("schedule",), custom_objects))


def distributed_optimizer(optimizer, backward_passes_per_step: int = 1, compression: str = "none"):
    """Wrap so that gradients are averaged across ranks before the optimizer sees them.

    LARS computes its trust ratios inside ``_resource_apply_dense``, after the allreduce, so
    all ranks apply identical updates. With gradient accumulation the learning-rate (and LARS
    momentum) schedules are made to count optimizer updates, not micro-batches.
    """
    k = int(backward_passes_per_step)
    if k < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {k}")
    if k > 1:
        lr = optimizer._get_hyper("learning_rate")
        if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
            optimizer._set_hyper("learning_rate", PerUpdateSchedule(lr, k))
        momentum = getattr(optimizer, "_momentum_schedule", None)
        if momentum is not None:
            optimizer._momentum_schedule = PerUpdateSchedule(momentum, k)
    codecs = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
    if compression not in codecs:
        raise ValueError(f"compression must be one of {', '.join(codecs)}, got {compression!r}")
    return hvd.DistributedOptimizer(optimizer, backward_passes_per_step=k,
                                    average_aggregated_gradients=True,
                                    compression=codecs[compression])


def broadcast_from_root(variables) -> None:
    hvd_tf.broadcast_variables(variables, root_rank=0)


def broadcast_object(obj, name: str):
    """Rank 0's picklable ``obj`` on every rank."""
    return hvd_tf.broadcast_object(obj, root_rank=0, name=name)


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
