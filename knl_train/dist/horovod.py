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


def distributed_optimizer(optimizer):
    """Wrap so that gradients are averaged across ranks before the optimizer sees them.

    LARS computes its trust ratios inside ``_resource_apply_dense``, after the allreduce, so
    all ranks apply identical updates.
    """
    return hvd.DistributedOptimizer(optimizer)


def broadcast_from_root(variables) -> None:
    hvd_tf.broadcast_variables(variables, root_rank=0)


def allreduce_sum(values, name: str) -> np.ndarray:
    """Sum a small float vector over all ranks (every rank must call this in the same order)."""
    t = tf.constant(np.asarray(values, dtype=np.float64))
    return hvd_tf.allreduce(t, op=hvd_tf.Sum, name=name).numpy()


def allreduce_mean(values, name: str) -> np.ndarray:
    t = tf.constant(np.asarray(values, dtype=np.float64))
    return hvd_tf.allreduce(t, op=hvd_tf.Average, name=name).numpy()


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
