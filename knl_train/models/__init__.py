"""Model registry and the networks it holds."""

from knl_train.models import small  # noqa: F401  (registers its models)
from knl_train.models.registry import MODELS, build, register

__all__ = ["MODELS", "build", "register"]
