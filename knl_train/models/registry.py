"""Model registry: ``build(name, num_classes, image_size)`` for every network knl-train trains."""

from __future__ import annotations

from typing import Callable, Dict

from knl_train.errors import UserError

MODELS: Dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def build(name: str, num_classes: int, image_size: int, **kwargs):
    """A Keras model, channels-last, with no L2 regularizers (LARS carries the weight decay)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, image_size=image_size, **kwargs)
