"""Model registry and the networks it holds.

The networks import TensorFlow; ``model_names`` does not, so a study checks its model name
without it. The registry's exports therefore load the networks on first use (PEP 562).
"""

__all__ = ["MODELS", "build", "names", "register"]


def __getattr__(name: str):
    if name in __all__:
        from knl_train.models import alexnet, resnet, small  # noqa: F401  (register their models)
        from knl_train.models import registry
        from knl_train.models.model_names import MODEL_NAMES
        registry.MODELS.check_names(MODEL_NAMES)
        globals().update({n: getattr(registry, n) for n in __all__})  # once: later reads are plain
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
