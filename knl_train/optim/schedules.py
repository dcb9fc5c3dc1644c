"""Learning-rate and momentum schedules from the large-batch papers, as serializable Keras schedules.

Step convention (every class here): ``step`` is the optimizer's iteration count, 0 for the first
update, as Keras passes ``optimizer.iterations`` to a schedule before incrementing it; it is also
Caffe's ``iter_``. An epoch ``e`` (0-based) is the steps ``[e·spe, (e+1)·spe)`` with
``spe = steps_per_epoch``. Durations given in epochs become ``round(epochs · spe)`` steps, the
trainer's convention.

Every schedule accepts a scalar or a tensor of steps (Python int, int/float tensor, or
``tf.Variable`` such as ``optimizer.iterations``), returns float32 of the same shape, and has no
Python branch on a tensor value, so it traces once inside ``tf.function``. All are registered
as ``knl_train>ClassName`` (and by their bare names: :mod:`knl_train.optim.keras_names`) and
round-trip through ``get_config``/``from_config`` and
``tf.keras.optimizers.schedules.serialize``/``deserialize`` (what Horovod's
``DistributedOptimizer`` relies on when it rebuilds the optimizer from its config).

Schedules:

* ``WarmupPolyDecay``   linear warmup, polynomial decay counted after the warmup (Google TPU,
  MLPerf, NUS) or over the global step (Intel Caffe / NVCaffe, lars.md §1, §5).
* ``WarmupStepDecay``   Goyal et al. 2017 (arXiv:1706.02677): linear warmup, then ×factor at
  boundary epochs (30, 60, 80).
* ``WarmupCosineDecay`` linear warmup, then half a cosine down to ``end_lr``.
* ``WarmupMomentumCorrection`` a *momentum* schedule: Goyal/Intel Caffe momentum correction
  ``m·lr(t)/lr(t−1)`` during warmup, for optimizers that keep the LR inside the momentum buffer.

``build_lr_schedule`` and ``build_momentum`` build them from epoch-based config values.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import tensorflow as tf

from knl_train.optim.keras_names import registered_schedule
from knl_train.optim.names import DECAY_MODES, SCHEDULE_KINDS
from knl_train.yamlconfig import number, one_of

LearningRateSchedule = tf.keras.optimizers.schedules.LearningRateSchedule


def _linear_warmup(step_f, warmup_steps: int, start_lr: float, peak_lr: float):
    """Caffe's ramp ``(t·peak + (W − t)·start)/W``: ``start_lr`` at step 0, ``peak_lr`` at step W."""
    warm = float(max(warmup_steps, 1))
    return start_lr + (peak_lr - start_lr) * step_f / warm


# ---- warmup + polynomial decay ---------------------------------------------------------------------
@registered_schedule
class WarmupPolyDecay(LearningRateSchedule):
    """Linear warmup from ``warmup_start_lr`` to ``peak_lr``, then polynomial decay to ``end_lr``.

    ``decay_over="after_warmup"`` decays over the ``total_steps - warmup_steps`` steps after the
    warmup (Google TPU / MLPerf, NUS). ``decay_over="global"`` counts the polynomial over the
    global step as Intel Caffe and NVCaffe do, so the LR drops when warmup ends: the AlexNet-BN
    32K recipe (peak 33, 10 of 100 epochs of warmup, power 2) goes 33 -> 33*(1-0.1)^2 = 26.73.
    """

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_start_lr: float = 0.0, end_lr: float = 0.0, power: float = 2.0,
                 decay_over: str = "after_warmup", name: str = "WarmupPolyDecay"):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if decay_over not in DECAY_MODES:
            raise ValueError(f"decay_over must be one of {DECAY_MODES}, got {decay_over!r}")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_lr = float(warmup_start_lr)
        self.end_lr = float(end_lr)
        self.power = float(power)
        self.decay_over = decay_over
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name):
            step = tf.cast(step, tf.float32)
            warmup_lr = _linear_warmup(step, self.warmup_steps, self.warmup_start_lr, self.peak_lr)
            if self.decay_over == "global":
                decay_step, decay_len = step, float(self.total_steps)
            else:
                decay_step = step - self.warmup_steps
                decay_len = float(self.total_steps - self.warmup_steps)
            if decay_len > 0:
                frac = 1.0 - tf.minimum(tf.maximum(decay_step, 0.0), decay_len) / decay_len
            else:  # warmup_steps == total_steps: no decay phase, end_lr from total_steps on
                frac = tf.zeros_like(step)
            decay_lr = self.end_lr + (self.peak_lr - self.end_lr) * tf.pow(frac, self.power)
            return tf.where(step < self.warmup_steps, warmup_lr, decay_lr)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr, "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps, "warmup_start_lr": self.warmup_start_lr,
            "end_lr": self.end_lr, "power": self.power, "decay_over": self.decay_over,
            "name": self.name,
        }


# ---- Goyal step decay --------------------------------------------------------------------------------
@registered_schedule
class WarmupStepDecay(LearningRateSchedule):
    """Goyal et al. 2017: optional linear warmup, then ``peak_lr · factor^k`` after k boundaries.

    For step ``t < W`` (``W = round(warmup_epochs · steps_per_epoch)``) the LR ramps linearly
    from ``warmup_start_lr`` (Goyal: the small-batch LR η) to ``peak_lr`` (Goyal: kη), reaching
    it at step W. From step W on it is ``peak_lr · factor^k`` with k the number of boundaries
    ``b`` with ``t >= round(b · steps_per_epoch)``: the first step of epoch 30 already has
    ``peak·0.1`` (Caffe ``multistep``: ``iter >= stepvalue``; note Keras
    ``PiecewiseConstantDecay`` switches one step later, at ``t > boundary``).

    Boundaries are absolute epochs counted from the start of training, warmup included, and must
    not fall inside the warmup.
    """

    def __init__(self, peak_lr: float, steps_per_epoch: int,
                 boundary_epochs: Sequence[float] = (30, 60, 80), factor: float = 0.1,
                 warmup_epochs: float = 0.0, warmup_start_lr: float = 0.0,
                 name: str = "WarmupStepDecay"):
        cls = type(self).__name__
        self.peak_lr = number(f"{cls}: peak_lr", peak_lr, above=0)
        self.steps_per_epoch = number(f"{cls}: steps_per_epoch", steps_per_epoch, minimum=1,
                                      integer=True)
        if isinstance(boundary_epochs, (str, bytes)) or not isinstance(boundary_epochs, Sequence):
            raise ValueError(f"{cls}: boundary_epochs must be a list of epochs, got {boundary_epochs!r}")
        bounds = [number(f"{cls}: boundary_epochs[{i}]", b, above=0)
                  for i, b in enumerate(boundary_epochs)]
        if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
            raise ValueError(f"{cls}: boundary_epochs must be strictly increasing, got {bounds}")
        self.boundary_epochs = bounds
        self.factor = number(f"{cls}: factor", factor, above=0, maximum=1)
        self.warmup_epochs = number(f"{cls}: warmup_epochs", warmup_epochs, minimum=0)
        if bounds and self.warmup_epochs > bounds[0]:
            raise ValueError(f"{cls}: warmup_epochs ({self.warmup_epochs}) must be <= the first "
                             f"boundary epoch ({bounds[0]})")
        self.warmup_start_lr = number(f"{cls}: warmup_start_lr", warmup_start_lr, minimum=0)
        self.name = name

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_epochs * self.steps_per_epoch))

    @property
    def boundary_steps(self):
        return [int(round(b * self.steps_per_epoch)) for b in self.boundary_epochs]

    def __call__(self, step):
        with tf.name_scope(self.name):
            step = tf.cast(step, tf.float32)
            warmup_lr = _linear_warmup(step, self.warmup_steps, self.warmup_start_lr, self.peak_lr)
            values = tf.constant([self.peak_lr * self.factor ** k
                                  for k in range(len(self.boundary_epochs) + 1)], tf.float32)
            bounds = tf.constant(self.boundary_steps, tf.float32, shape=[len(self.boundary_epochs)])
            passed = tf.reduce_sum(tf.cast(step[..., None] >= bounds, tf.int32), axis=-1)
            return tf.where(step < self.warmup_steps, warmup_lr, tf.gather(values, passed))

    def get_config(self):
        return {
            "peak_lr": self.peak_lr, "steps_per_epoch": self.steps_per_epoch,
            "boundary_epochs": list(self.boundary_epochs), "factor": self.factor,
            "warmup_epochs": self.warmup_epochs, "warmup_start_lr": self.warmup_start_lr,
            "name": self.name,
        }


# ---- cosine ------------------------------------------------------------------------------------------
@registered_schedule
class WarmupCosineDecay(LearningRateSchedule):
    """Linear warmup to ``peak_lr`` over ``warmup_steps``, then half a cosine to ``end_lr``.

    ``lr(t) = end + (peak − end)·(1 + cos(π·p))/2`` with ``p = (t − W)/(total_steps − W)`` clipped
    to [0, 1]: ``peak_lr`` at step W, the mean of peak and end half-way, ``end_lr`` from
    ``total_steps`` on. (SimCLR's 10-epoch warmup + cosine, lars.md §2.3.)
    """

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_start_lr: float = 0.0, end_lr: float = 0.0,
                 name: str = "WarmupCosineDecay"):
        cls = type(self).__name__
        self.peak_lr = number(f"{cls}: peak_lr", peak_lr, above=0)
        self.total_steps = number(f"{cls}: total_steps", total_steps, minimum=1, integer=True)
        self.warmup_steps = number(f"{cls}: warmup_steps", warmup_steps, minimum=0, integer=True)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"{cls}: warmup_steps must be in [0, total_steps={self.total_steps}], "
                             f"got {self.warmup_steps}")
        self.warmup_start_lr = number(f"{cls}: warmup_start_lr", warmup_start_lr, minimum=0)
        self.end_lr = number(f"{cls}: end_lr", end_lr, minimum=0)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name):
            step = tf.cast(step, tf.float32)
            warmup_lr = _linear_warmup(step, self.warmup_steps, self.warmup_start_lr, self.peak_lr)
            decay_len = float(self.total_steps - self.warmup_steps)
            if decay_len > 0:
                p = tf.clip_by_value((step - self.warmup_steps) / decay_len, 0.0, 1.0)
            else:  # no decay phase: end_lr from total_steps on
                p = tf.ones_like(step)
            cosine_lr = self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (1.0 + tf.cos(math.pi * p))
            return tf.where(step < self.warmup_steps, warmup_lr, cosine_lr)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr, "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps, "warmup_start_lr": self.warmup_start_lr,
            "end_lr": self.end_lr, "name": self.name,
        }


# ---- momentum correction -------------------------------------------------------------------------------
@registered_schedule
class WarmupMomentumCorrection(LearningRateSchedule):
    """Momentum schedule: ``m·lr(t)/lr(t−1)`` while the LR warms up, ``m`` otherwise.

    Goyal et al. 2017 §2.2 and Intel Caffe (``SGDSolver::ComputeUpdateValue``, lars.md §1). With
    the LR inside the momentum buffer, ``v_t = m_t·v_{t−1} + lr(t)·d_t`` (LARS ``you`` and
    ``model_garden`` variants, Caffe SGD), this correction makes ``v_t = lr(t)·u_t`` with
    ``u_t = m·u_{t−1} + d_t``: the trajectory of an LR-*outside* momentum SGD, so a ramping LR
    rescales the history accumulated at smaller LRs. Do not use it with the ``tf_contrib``
    variant, whose LR is already outside the buffer.

    Exact convention (``t`` = ``optimizer.iterations``, 0 for the first update; the optimizer
    evaluates the LR schedule and this schedule at the same ``t``):

    * ``0 < t < warmup_steps`` and ``lr(t−1) > 0``: ``m · lr(t) / lr(t−1)``;
    * ``t = 0`` (no history yet; Caffe clamps ``t−1`` to 0, ratio 1): ``m``;
    * ``lr(t−1) = 0`` (e.g. a warmup from 0 at t = 1; the history is then ``lr(0)·d = 0``, so
      any value gives the same update; Caffe would divide by zero): ``m``;
    * ``t >= warmup_steps``: exactly ``m``. The first step after the warmup is not corrected,
      even when the LR jumps there (Intel Caffe's 33 → 26.73 drop over the global step).

    The ratio is not clipped: for a ramp from 0 it is ``t/(t−1)``, so ``m_2 = 2m > 1`` is
    expected and correct for the LR-inside form.

    ``warmup_steps=None`` takes ``lr_schedule.warmup_steps`` (all warmup schedules here have it).
    Intel Caffe computes ``lr(t−1)`` with the warmup formula; inside the warmup this is the
    same as evaluating ``lr_schedule`` at ``t−1``, which is what this class does, so it works
    with any LR schedule.
    """

    def __init__(self, lr_schedule, momentum: float = 0.9, warmup_steps: Optional[int] = None,
                 name: str = "WarmupMomentumCorrection"):
        cls = type(self).__name__
        if isinstance(lr_schedule, dict):
            lr_schedule = tf.keras.optimizers.schedules.deserialize(lr_schedule)
        if not isinstance(lr_schedule, LearningRateSchedule):
            raise ValueError(f"{cls}: lr_schedule must be a tf.keras.optimizers.schedules."
                             f"LearningRateSchedule (the optimizer's LR schedule), got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.momentum = number(f"{cls}: momentum", momentum, minimum=0, below=1)
        if warmup_steps is None:
            warmup_steps = getattr(lr_schedule, "warmup_steps", None)
            if warmup_steps is None:
                raise ValueError(f"{cls}: warmup_steps is required: {type(lr_schedule).__name__} "
                                 f"has no warmup_steps attribute")
        self.warmup_steps = number(f"{cls}: warmup_steps", warmup_steps, minimum=0, integer=True)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name):
            step = tf.convert_to_tensor(step)
            prev = tf.maximum(step - tf.ones_like(step), tf.zeros_like(step))
            lr_t = tf.cast(self.lr_schedule(step), tf.float32)
            lr_prev = tf.cast(self.lr_schedule(prev), tf.float32)
            positive = lr_prev > 0.0
            # Divide by 1 where lr(t−1) = 0 so that neither branch of the where holds inf/NaN.
            ratio = tf.where(positive, lr_t / tf.where(positive, lr_prev, tf.ones_like(lr_prev)),
                             tf.ones_like(lr_t))
            step_f = tf.cast(step, tf.float32)
            in_warmup = tf.logical_and(step_f >= 1.0, step_f < float(self.warmup_steps))
            m = tf.constant(self.momentum, tf.float32)
            return tf.where(in_warmup, m * ratio, m * tf.ones_like(ratio))

    def get_config(self):
        return {
            "lr_schedule": tf.keras.optimizers.schedules.serialize(self.lr_schedule),
            "momentum": self.momentum, "warmup_steps": self.warmup_steps, "name": self.name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**deserialize_schedules(config, ("lr_schedule",), custom_objects))


def deserialize_schedules(config: dict, keys, custom_objects=None) -> dict:
    """A copy of ``config`` with the serialized schedules under ``keys`` rebuilt."""
    config = dict(config)
    for key in keys:
        if isinstance(config.get(key), dict):
            config[key] = tf.keras.optimizers.schedules.deserialize(config[key],
                                                                    custom_objects=custom_objects)
    return config


class ScheduledMomentum:
    """For a legacy Keras optimizer whose momentum is a number or a schedule of the step (Goyal's
    momentum correction): set it, read it per step, and keep it through ``get_config``."""

    def _set_momentum(self, momentum) -> None:
        self._momentum_schedule = momentum if callable(momentum) else None
        # A schedule is evaluated per step in _momentum(); the hyper keeps Keras's variable.
        self._set_hyper("momentum", 0.0 if self._momentum_schedule else momentum)

    def _momentum(self, dtype):
        if self._momentum_schedule is not None:
            return tf.cast(self._momentum_schedule(self.iterations), dtype)
        return tf.identity(self._get_hyper("momentum", dtype))

    def _momentum_config(self):
        if self._momentum_schedule is not None:
            return tf.keras.optimizers.schedules.serialize(self._momentum_schedule)
        return self._serialize_hyperparameter("momentum")

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # The base class rebuilds a learning-rate schedule; a momentum schedule is ours to do.
        config = deserialize_schedules(config, ("momentum",), custom_objects)
        return super().from_config(config, custom_objects=custom_objects)


# ---- builders from epoch-based config values ------------------------------------------------------------
def build_lr_schedule(kind: str, *, steps_per_epoch: int, epochs: float, peak_lr: float,
                      warmup_epochs: float = 0.0, warmup_start_lr: float = 0.0,
                      end_lr: float = 0.0, power: float = 2.0, decay_over: str = "after_warmup",
                      boundary_epochs: Sequence[float] = (30, 60, 80),
                      decay_factor: float = 0.1) -> LearningRateSchedule:
    """The LR schedule ``kind`` ("poly", "step", "cosine") for a run of ``epochs`` epochs.

    ``total_steps = round(epochs · steps_per_epoch)`` and
    ``warmup_steps = min(total_steps, round(warmup_epochs · steps_per_epoch))`` (the trainer's
    convention). ``poly`` uses ``end_lr``, ``power``, ``decay_over``; ``cosine`` uses ``end_lr``;
    ``step`` uses ``boundary_epochs`` and ``decay_factor`` and ignores the others.
    """
    one_of("schedule kind", kind, SCHEDULE_KINDS)
    spe = number("build_lr_schedule: steps_per_epoch", steps_per_epoch, minimum=1, integer=True)
    epochs = number("build_lr_schedule: epochs", epochs, above=0)
    warmup_epochs = number("build_lr_schedule: warmup_epochs", warmup_epochs, minimum=0)
    total = max(1, int(round(epochs * spe)))
    warmup = min(total, int(round(warmup_epochs * spe)))
    if kind == "poly":
        return WarmupPolyDecay(peak_lr=peak_lr, total_steps=total, warmup_steps=warmup,
                               warmup_start_lr=warmup_start_lr, end_lr=end_lr, power=power,
                               decay_over=decay_over)
    if kind == "cosine":
        return WarmupCosineDecay(peak_lr=peak_lr, total_steps=total, warmup_steps=warmup,
                                 warmup_start_lr=warmup_start_lr, end_lr=end_lr)
    return WarmupStepDecay(peak_lr=peak_lr, steps_per_epoch=spe, boundary_epochs=boundary_epochs,
                           factor=decay_factor, warmup_epochs=warmup_epochs,
                           warmup_start_lr=warmup_start_lr)


def build_momentum(momentum: float, lr_schedule: LearningRateSchedule,
                   correction: bool) -> Union[float, WarmupMomentumCorrection]:
    """``momentum`` as is, or wrapped in ``WarmupMomentumCorrection`` over the schedule's warmup."""
    if not correction:
        return momentum
    return WarmupMomentumCorrection(lr_schedule, momentum=momentum)


__all__ = ["DECAY_MODES", "SCHEDULE_KINDS", "deserialize_schedules", "WarmupPolyDecay", "WarmupStepDecay",
           "WarmupCosineDecay", "WarmupMomentumCorrection", "build_lr_schedule", "build_momentum"]


# ---- gradient accumulation: count optimizer updates, not micro-batches ---------------------------------
@registered_schedule
class PerUpdateSchedule(LearningRateSchedule):
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
        return cls(**deserialize_schedules(config, ("schedule",), custom_objects))


def per_update(schedule, passes: int):
    """``schedule`` as the optimizer must see it under ``passes`` accumulated micro-batches per
    update: wrapped in ``PerUpdateSchedule`` when it is a schedule and ``passes > 1``, else as is
    (a constant, or no accumulation)."""
    passes = number("per_update: passes", passes, minimum=1, integer=True)
    if passes == 1 or not isinstance(schedule, LearningRateSchedule):
        return schedule
    return PerUpdateSchedule(schedule, passes)


__all__ += ["PerUpdateSchedule", "per_update"]
