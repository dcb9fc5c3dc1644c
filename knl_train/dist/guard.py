"""The ranks' periodic agreement: one small allgather that answers five questions at once.

* Do all ranks hold the same weights? Each rank sums the bit patterns of its trainable weights
  as integers (order-free, hence exact) into a checksum; a setup that does not average
  gradients (Horovod under Keras 3 is one) shows up as differing checksums.
* Did any rank see a non-finite loss, and at which step first?
* Did any rank receive a stop signal (SIGTERM/SIGUSR1 from the scheduler)?
* Does rank 0 want a timed checkpoint?
* How busy was each rank since the last agreement (its step time less its wait in the gradient
  allreduce)? In lock-step every rank's wall step time is the same; the busy time shows the
  straggler that the others wait for.

Each rank contributes one row of six doubles to one allgather (at 8192 ranks, 384 KiB every
``guard.every`` steps), so every rank reaches the same decision at the same step and no step
pays for a collective of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from knl_train import records
from knl_train.dist.horovod import allgather

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
    checksums: Tuple[float, ...]      # by rank (all 0.0 on one rank)
    busy_seconds: Tuple[float, ...]   # by rank: busy seconds since the last agreement
    updates: Tuple[int, ...]          # by rank: optimizer updates since the last agreement


def agree(*, stop: bool, checkpoint: bool, nonfinite_step: Optional[int],
          checksum: Optional[float], busy_seconds: float = 0.0, updates: int = 0) -> Agreement:
    """Every rank calls this at the same step; all get the same answer."""
    rows = allgather([float(stop), float(checkpoint),
                      float(_NO_STEP if nonfinite_step is None else nonfinite_step),
                      0.0 if checksum is None else checksum, busy_seconds, float(updates)],
                     name="knl_train.guard")
    first_bad = rows[:, 2].min()
    checksums = tuple(float(c) for c in rows[:, 3])
    return Agreement(stop=bool(rows[:, 0].max() > 0), checkpoint=bool(rows[:, 1].max() > 0),
                     nonfinite_step=None if first_bad >= _NO_STEP else int(first_bad),
                     diverged=checksum is not None and len(set(checksums)) > 1,
                     checksums=checksums, busy_seconds=tuple(float(b) for b in rows[:, 4]),
                     updates=tuple(int(u) for u in rows[:, 5]))


def spread(busy_per_step: Sequence[float], hosts: Sequence[str]) -> dict:
    """The epoch record's straggler fields from each rank's busy seconds per step: median, max,
    max/median, the slowest rank and its host, and the ranks slower than the median by more
    than ``records.SLOW_FACTOR`` (slowest first, at most ``records.SLOW_RANKS_KEPT``)."""
    busy = np.asarray(busy_per_step, dtype=np.float64)
    median = float(np.median(busy))
    slowest = int(np.argmax(busy))
    host = lambda r: hosts[r] if r < len(hosts) else "?"  # noqa: E731
    slow = [r for r in np.argsort(-busy, kind="stable")
            if median > 0 and busy[r] > median * records.SLOW_FACTOR][:records.SLOW_RANKS_KEPT]
    return {"busy_step_seconds_median": median, "busy_step_seconds_max": float(busy[slowest]),
            "busy_spread": float(busy[slowest] / median) if median > 0 else None,
            "slowest_rank": slowest, "slowest_host": host(slowest),
            "slow_ranks": [[int(r), host(int(r)), float(busy[r])] for r in slow]}


def describe_divergence(step: int, checksums: list) -> str:
    """Name the ranks whose weights differ from rank 0's."""
    odd = [r for r, c in enumerate(checksums) if c != checksums[0]]
    return (f"ranks hold different weights at step {step}: rank(s) {', '.join(map(str, odd))} "
            f"differ from rank 0 (weight checksums {', '.join(f'{c:.0f}' for c in checksums[:8])}"
            f"{', ...' if len(checksums) > 8 else ''}). Gradients are not being averaged: the "
            "optimizer must be wrapped by hvd.DistributedOptimizer, and Horovod's Keras "
            "integration silently stops averaging under TF >= 2.16 / Keras 3; use TF 2.15.")
