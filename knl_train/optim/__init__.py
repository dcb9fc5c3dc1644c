"""Optimizers (LARS, LAMB, SGD), schedules, scaling rules and recipes for large-batch training.

The optimizers and schedules import TensorFlow; ``names``, ``scaling``, ``recipes`` and
``exclusion`` do not, so the training config loads and fails fast without it. The exports
below that need TensorFlow are therefore loaded on first use (PEP 562).
"""

from knl_train.optim.exclusion import RANK_LE_1

__all__ = ["LAMB", "LARS", "RANK_LE_1", "OPTIMIZERS", "SGD", "WarmupPolyDecay", "build_optimizer"]


def __getattr__(name: str):
    if name == "LARS":
        from knl_train.optim.lars import LARS
        return LARS
    if name == "LAMB":
        from knl_train.optim.lamb import LAMB
        return LAMB
    if name == "SGD":
        from knl_train.optim.sgd import SGD
        return SGD
    if name == "WarmupPolyDecay":
        from knl_train.optim.schedules import WarmupPolyDecay
        return WarmupPolyDecay
    if name in ("OPTIMIZERS", "build_optimizer"):
        from knl_train.optim import registry
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
