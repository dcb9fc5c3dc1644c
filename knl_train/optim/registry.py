"""Optimizer registry: config names to legacy Keras optimizers (Horovod wraps only those).

It registers exactly the names of ``optim/names.py`` (checked at import), the list the training
config validates against before TensorFlow is imported.
"""

from __future__ import annotations

from typing import Dict, Tuple

from knl_train.optim.lamb import LAMB
from knl_train.optim.lars import LARS
from knl_train.optim.names import OPTIMIZER_NAMES
from knl_train.optim.sgd import SGD
from knl_train.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
register = OPTIMIZERS.register


@register("lars")
def _lars(learning_rate, momentum, cfg):
    """LARS (You et al. 2017): momentum SGD with a per-layer trust ratio; three variants."""
    return LARS(learning_rate=learning_rate, momentum=momentum,
                weight_decay=cfg.weight_decay, trust_coefficient=cfg.trust_coefficient,
                epsilon=0.0 if cfg.epsilon is None else cfg.epsilon, nesterov=cfg.nesterov,
                variant=cfg.variant, exclude_from_weight_decay=cfg.exclude_from_weight_decay,
                exclude_from_layer_adaptation=cfg.exclude_from_layer_adaptation)


@register("lamb")
def _lamb(learning_rate, momentum, cfg):
    """LAMB (You et al. 2020): Adam moments with a per-layer trust ratio."""
    # LAMB has no momentum of its own: beta_1 plays that part.
    eps = {} if cfg.epsilon is None else {"epsilon": cfg.epsilon}
    return LAMB(learning_rate=learning_rate, beta_1=cfg.beta_1, beta_2=cfg.beta_2,
                weight_decay=cfg.weight_decay, exclude_from_weight_decay=cfg.exclude_from_weight_decay,
                exclude_from_layer_adaptation=cfg.exclude_from_layer_adaptation, **eps)


@register("sgd")
def _sgd(learning_rate, momentum, cfg):
    """Momentum SGD (Goyal et al. 2017) with L2 weight decay; BN/bias not decayed by default."""
    # The baseline gets the weight decay and exclusions LARS gets, or the comparison is unfair.
    return SGD(learning_rate=learning_rate, momentum=momentum, nesterov=cfg.nesterov,
               weight_decay=cfg.weight_decay, exclude_from_weight_decay=cfg.exclude_from_weight_decay)


# The config validates optimizer.name against names.py without importing this module.
OPTIMIZERS.check_names(OPTIMIZER_NAMES)


def names() -> Tuple[str, ...]:
    """The registered optimizer names, sorted."""
    return OPTIMIZERS.names()


def describe() -> Dict[str, str]:
    """Each optimizer name with a one-line description."""
    return OPTIMIZERS.describe()


def build_optimizer(cfg, learning_rate, momentum=None):
    """Build the optimizer named by ``cfg.name`` (an OptimizerConfig).

    ``momentum`` overrides ``cfg.momentum``, e.g. with a momentum-correction schedule.
    """
    build = OPTIMIZERS.lookup(cfg.name)
    return build(learning_rate, cfg.momentum if momentum is None else momentum, cfg)


__all__ = ["OPTIMIZERS", "build_optimizer", "describe", "names", "register"]
