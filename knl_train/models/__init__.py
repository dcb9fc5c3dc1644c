"""Model registry and the networks it holds."""

from knl_train.models import alexnet, resnet, small  # noqa: F401  (register their models)
from knl_train.models.registry import MODELS, build, names, register

__all__ = ["MODELS", "build", "names", "register"]
