"""Model registry: ``build(name, num_classes, image_size)`` for every network knl-train trains."""

from __future__ import annotations

from typing import Tuple

from knl_train.registry import Registry

MODELS: Registry = Registry("model")
register = MODELS.register


def names() -> Tuple[str, ...]:
    """The registered model names, sorted (all of them once ``knl_train.models`` is imported)."""
    return MODELS.names()


def build(name: str, num_classes: int, image_size: int, **kwargs):
    """A Keras model, channels-last, with no L2 regularizers (LARS carries the weight decay)."""
    return MODELS.lookup(name)(num_classes=num_classes, image_size=image_size, **kwargs)
