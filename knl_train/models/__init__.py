"""Model registry and the networks it holds."""

from knl_train.models import alexnet, resnet, small  # noqa: F401  (register their models)
from knl_train.models.registry import MODELS, build, register

__all__ = ["MODELS", "build", "register"]
