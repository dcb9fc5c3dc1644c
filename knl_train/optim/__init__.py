"""Optimizers (LARS, LAMB, SGD), schedules, scaling rules and recipes for large-batch training."""

from knl_train.optim.exclusion import RANK_LE_1
from knl_train.optim.lamb import LAMB
from knl_train.optim.lars import LARS
from knl_train.optim.registry import OPTIMIZERS, build_optimizer
from knl_train.optim.schedules import WarmupPolyDecay

__all__ = ["LAMB", "LARS", "RANK_LE_1", "OPTIMIZERS", "WarmupPolyDecay", "build_optimizer"]
