"""Optimizer registry: config names to legacy Keras optimizers (Horovod wraps only those)."""

from __future__ import annotations

from typing import Callable, Dict

import tensorflow as tf

from knl_train.optim.lamb import LAMB
from knl_train.optim.lars import LARS

OPTIMIZERS: Dict[str, Callable[..., tf.keras.optimizers.legacy.Optimizer]] = {}


def register(name: str):
    def deco(fn):
        OPTIMIZERS[name] = fn
        return fn
    return deco


@register("lars")
def _lars(learning_rate, momentum, cfg):
    return LARS(learning_rate=learning_rate, momentum=momentum,
                weight_decay=cfg.weight_decay, trust_coefficient=cfg.trust_coefficient,
                epsilon=0.0 if cfg.epsilon is None else cfg.epsilon, nesterov=cfg.nesterov,
                variant=cfg.variant, exclude_from_weight_decay=cfg.exclude_from_weight_decay,
                exclude_from_layer_adaptation=cfg.exclude_from_layer_adaptation)


@register("lamb")
def _lamb(learning_rate, momentum, cfg):
    # LAMB has no momentum of its own: beta_1 plays that part.
    eps = {} if cfg.epsilon is None else {"epsilon": cfg.epsilon}
    return LAMB(learning_rate=learning_rate, beta_1=cfg.beta_1, beta_2=cfg.beta_2,
                weight_decay=cfg.weight_decay, exclude_from_weight_decay=cfg.exclude_from_weight_decay,
                exclude_from_layer_adaptation=cfg.exclude_from_layer_adaptation, **eps)


@register("sgd")
def _sgd(learning_rate, momentum, cfg):
    # Plain momentum SGD carries no weight decay of its own; use it as the baseline.
    return tf.keras.optimizers.legacy.SGD(learning_rate=learning_rate, momentum=momentum,
                                          nesterov=cfg.nesterov)


def build_optimizer(cfg, learning_rate, momentum=None):
    """Build the optimizer named by ``cfg.name`` (an OptimizerConfig).

    ``momentum`` overrides ``cfg.momentum``, e.g. with a momentum-correction schedule.
    """
    return OPTIMIZERS[cfg.name](learning_rate, cfg.momentum if momentum is None else momentum, cfg)
