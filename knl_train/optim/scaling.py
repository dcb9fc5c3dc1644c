"""Learning-rate and warmup scaling from a reference batch size.

* ``linear`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv:1706.02677): multiply the
  LR by ``k = batch / base_batch`` (their η = 0.1·kn/256), keep the warmup length in epochs.
* ``sqrt`` (Hoffer et al. 2017; You et al., "Large-Batch Training for LSTM and Beyond", SC'19,
  arXiv:1901.08256): multiply the LR by ``√k``.
* ``none``: keep the LR.

LEGW ("linear-epoch gradual warmup", the same SC'19 paper): with ``sqrt`` scaling, multiply the
warmup length *in epochs* by ``k`` too. Sources used: the paper's abstract (arXiv:1901.08256 and
Berkeley tech report EECS-2018-138: LEGW makes Sqrt Scaling work up to 32K for CNNs) and a
summary of its method (shortscience.org, "scale the warmup period (in epochs) by k ... the
amplitude by √k"); the paper's text itself was not consulted. The NUS lab's ResNet-50 LARS
table (lars.md §5) follows it exactly: 512 → LR 2^2, 10/2^6 warmup epochs; 8K → LR 2^4 = 16,
10/2^2 = 2.5 epochs.

The ``legw_warmup_epochs``/``scale_learning_rate`` pair is what ``scale_schedule`` applies.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from knl_train.optim.names import SCALING_RULES, WARMUP_RULES
from knl_train.yamlconfig import number, one_of


def _samples(arg: str, value) -> float:
    """A batch size: a positive whole number (8192 or 8192.0)."""
    value = number(arg, value, above=0)
    if not value.is_integer():
        raise ValueError(f"{arg} must be a whole number of samples, got {value!r}")
    return value


def batch_ratio(base_batch, batch) -> float:
    """``k = batch / base_batch`` after checking both are positive whole numbers."""
    return _samples("batch", batch) / _samples("base_batch", base_batch)


def scale_learning_rate(base_lr, base_batch, batch, rule: str = "linear") -> float:
    """The LR for ``batch`` given ``base_lr`` tuned at ``base_batch``, by ``rule``.

    >>> scale_learning_rate(0.1, 256, 8192, "linear")
    3.2
    """
    one_of("LR scaling rule", rule, SCALING_RULES)
    lr = number("base_lr", base_lr, above=0)
    k = batch_ratio(base_batch, batch)
    if rule == "linear":
        return lr * k
    if rule == "sqrt":
        return lr * math.sqrt(k)
    return lr


def legw_warmup_epochs(base_warmup_epochs, base_batch, batch) -> float:
    """LEGW: the warmup (in epochs) grows linearly with the batch, ``base_warmup_epochs · k``.

    A zero warmup stays zero. ``legw_warmup_epochs(2.5, 8192, 32768) == 10.0``.
    """
    warmup = number("base_warmup_epochs", base_warmup_epochs, minimum=0)
    return warmup * batch_ratio(base_batch, batch)


class ScaledSchedule(NamedTuple):
    peak_lr: float
    warmup_epochs: float


def scale_schedule(peak_lr, warmup_epochs, base_batch, batch, rule: str = "linear",
                   warmup_rule: str = "constant") -> ScaledSchedule:
    """Peak LR by ``rule`` and warmup epochs by ``warmup_rule`` ("constant" or "legw").

    Goyal: ``rule="linear", warmup_rule="constant"``; You et al. LEGW: ``rule="sqrt",
    warmup_rule="legw"``.
    """
    one_of("warmup scaling rule", warmup_rule, WARMUP_RULES)
    lr = scale_learning_rate(peak_lr, base_batch, batch, rule)
    if warmup_rule == "legw":
        warmup = legw_warmup_epochs(warmup_epochs, base_batch, batch)
    else:
        warmup = number("warmup_epochs", warmup_epochs, minimum=0)
    return ScaledSchedule(lr, warmup)


__all__ = ["SCALING_RULES", "WARMUP_RULES", "ScaledSchedule", "batch_ratio",
           "legw_warmup_epochs", "scale_learning_rate", "scale_schedule"]
