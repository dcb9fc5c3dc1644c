"""The ranks' periodic agreement: one small allreduce that answers four questions at once.

* Do all ranks hold the same weights? Each rank sums the bit patterns of its trainable weights
  as integers (order-free, hence exact) into a checksum; a setup that does not average
  gradients (Horovod under Keras 3 is one) shows up as differing checksums.
* Did any rank see a non-finite loss, and at which step first?
* Did any rank receive a stop signal (SIGTERM/SIGUSR1 from the scheduler)?
* Does rank 0 want a timed checkpoint?

All four ride in one ``Max`` allreduce of five doubles, so every rank reaches the same decision
at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import horovod.tensorflow as hvd
import tensorflow as tf

from knl_train.dist.horovod import allreduce_max

_NO_STEP = 1e18


def weights_checksum(variables: Sequence[tf.Variable]) -> float:
    """An exact, order-independent checksum of the variables' bits (equal bits, equal sums)."""
    return float(_checksum(list(variables)))


@tf.function(reduce_retracing=True)
def _checksum(variables):
    total = tf.constant(0, tf.int64)
    for i, v in enumerate(variables):
        x = tf.reshape(v, [-1])
        if x.dtype != tf.float32:
            x = tf.cast(x, tf.float32)
        bits = tf.cast(tf.bitcast(x, tf.int32), tf.int64)
        # Weighted by position so that two variables trading values still changes the sum.
        total += tf.reduce_sum(bits) * (i + 1)
    return tf.math.floormod(total, 2 ** 52)  # exact in a double


@dataclass(frozen=True)
class Agreement:
    stop: bool
    checkpoint: bool
    nonfinite_step: Optional[int]
    diverged: bool


def agree(*, stop: bool, checkpoint: bool, nonfinite_step: Optional[int],
          checksum: Optional[float]) -> Agreement:
    """Every rank calls this at the same step; all get the same answer."""
    c = 0.0 if checksum is None else checksum
    out = allreduce_max([float(stop), float(checkpoint),
                         -float(_NO_STEP if nonfinite_step is None else nonfinite_step), c, -c],
                        name="knl_train.guard")
    first_bad = -out[2]
    return Agreement(stop=out[0] > 0, checkpoint=out[1] > 0,
                     nonfinite_step=None if first_bad >= _NO_STEP else int(first_bad),
                     diverged=checksum is not None and out[3] != -out[4])


def checksums_by_rank(checksum: float) -> list:
    """Every rank's checksum (for the error message, once divergence is known)."""
    return [float(x) for x in hvd.allgather(tf.constant([checksum], tf.float64),
                                            name="knl_train.guard.ranks").numpy()]


def describe_divergence(step: int, checksums: list) -> str:
    """Name the ranks whose weights differ from rank 0's."""
    odd = [r for r, c in enumerate(checksums) if c != checksums[0]]
    return (f"ranks hold different weights at step {step}: rank(s) {', '.join(map(str, odd))} "
            f"differ from rank 0 (weight checksums {', '.join(f'{c:.0f}' for c in checksums[:8])}"
            f"{', ...' if len(checksums) > 8 else ''}). Gradients are not being averaged: the "
            "optimizer must be wrapped by hvd.DistributedOptimizer, and Horovod's Keras "
            "integration silently stops averaging under TF >= 2.16 / Keras 3; use TF 2.15.")
