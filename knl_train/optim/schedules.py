"""Learning-rate schedules from the large-batch papers, as serializable Keras schedules.

``step`` is the optimizer's iteration count (0 for the first update).
"""

from __future__ import annotations

import tensorflow as tf

DECAY_MODES = ("after_warmup", "global")


@tf.keras.utils.register_keras_serializable(package="knl_train")
class WarmupPolyDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
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
            warm = float(max(self.warmup_steps, 1))
            warmup_lr = self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * step / warm
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
