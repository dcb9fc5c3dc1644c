"""The one list of names for each optimizer choice, without TensorFlow.

The training config validates against these (as ``Literal`` types, so a bad value is named
with its dotted field before TensorFlow is imported); the optimizer registry asserts at import
that it registers exactly ``OPTIMIZER_NAMES``; LARS, the schedules, the scaling rules and the
recipes check their arguments against the tuples.
"""

from __future__ import annotations

from typing import Literal, get_args

OptimizerName = Literal["lars", "lamb", "sgd"]
# LARS variants (optim/lars.py): You et al.'s Algorithm 1, tf.contrib, TF Model Garden.
LarsVariant = Literal["you", "tf_contrib", "model_garden"]
ScheduleKind = Literal["poly", "step", "cosine"]
# Polynomial decay counted after the warmup (Google, MLPerf, NUS) or over the global step (Caffe).
DecayMode = Literal["after_warmup", "global"]
# LR scaling from a reference batch (optim/scaling.py) and the warmup's: constant epochs or LEGW.
ScalingRule = Literal["linear", "sqrt", "none"]
WarmupRule = Literal["constant", "legw"]
# Horovod's allreduce codecs: full precision, or gradients as float16 on the wire.
Compression = Literal["none", "fp16"]

OPTIMIZER_NAMES = get_args(OptimizerName)
VARIANTS = get_args(LarsVariant)
SCHEDULE_KINDS = get_args(ScheduleKind)
DECAY_MODES = get_args(DecayMode)
SCALING_RULES = get_args(ScalingRule)
WARMUP_RULES = get_args(WarmupRule)
COMPRESSIONS = get_args(Compression)

__all__ = ["COMPRESSIONS", "DECAY_MODES", "OPTIMIZER_NAMES", "SCALING_RULES", "SCHEDULE_KINDS",
           "VARIANTS", "WARMUP_RULES", "Compression", "DecayMode", "LarsVariant", "OptimizerName",
           "ScalingRule", "ScheduleKind", "WarmupRule"]
