"""Optimizers (LARS, LAMB, SGD), schedules, scaling rules and recipes for large-batch training.

The optimizers and schedules import TensorFlow; ``names``, ``scaling``, ``recipes`` and
``exclusion`` do not, so the training config loads and fails fast without it. The exports
below that need TensorFlow are therefore loaded on first use (PEP 562). The first of them
loads ``keras_save`` too, which registers every optimizer and schedule with Keras, so that
``tf.keras.models.load_model`` reads a model saved with any of them without ``custom_objects``.
"""

from knl_train.optim.exclusion import RANK_LE_1

__all__ = ["LAMB", "LARS", "RANK_LE_1", "OPTIMIZERS", "SGD", "WarmupPolyDecay", "build_optimizer",
           "load_model", "register_keras_objects"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # With keras_save, every optimizer and schedule is known to Keras, whichever is asked for.
    from knl_train.optim import keras_save, lamb, lars, registry, schedules, sgd
    homes = {"LARS": lars, "LAMB": lamb, "SGD": sgd, "WarmupPolyDecay": schedules,
             "OPTIMIZERS": registry, "build_optimizer": registry, "load_model": keras_save,
             "register_keras_objects": keras_save}
    return getattr(homes[name], name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
