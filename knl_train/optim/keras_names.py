"""The names under which Keras saves and finds knl-train's optimizers and schedules.

Each class is registered as ``knl_train>ClassName``. Two gaps of Keras 2.15 need more:

* It writes a schedule inside an optimizer's config in its new format (``class_name``
  ``"WarmupPolyDecay"``, ``registered_name`` ``"knl_train>WarmupPolyDecay"``) also into ``.h5``
  files and SavedModels, but reads those two back with its legacy reader, which looks up
  ``class_name`` alone ("Unknown decay: WarmupPolyDecay"). So a schedule is registered by its
  bare class name too, where no other object holds that name.
* Horovod's ``DistributedOptimizer`` wraps an optimizer in a subclass of the same name made on
  the fly, which Keras saves under that bare name ("Unknown optimizer: LARS" on loading). Such a
  subclass saves under its base's registered name instead, so the model loads with the plain
  optimizer, as a wrapped Keras SGD loads as SGD.
"""

from __future__ import annotations

import tensorflow as tf

PACKAGE = "knl_train"


def registered(cls):
    """Register ``cls`` with Keras as ``knl_train>ClassName`` (a class decorator)."""
    return tf.keras.utils.register_keras_serializable(package=PACKAGE)(cls)


def registered_schedule(cls):
    """``registered``, and known by its bare class name too (see the module docstring)."""
    cls = registered(cls)
    tf.keras.utils.get_custom_objects().setdefault(cls.__name__, cls)
    return cls


class SavedAsBase:
    """Mixin for a registered optimizer: a subclass that keeps its name (Horovod's wrapper)
    saves under the name of the class it wraps, and that name still loads the class."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = next((b for b in cls.__mro__[1:] if b.__name__ == cls.__name__), None)
        if base is None:
            return
        name = tf.keras.utils.get_registered_name(base)
        if name.startswith(f"{PACKAGE}>"):
            # The decorator records both directions; give the name back to the base.
            tf.keras.utils.register_keras_serializable(PACKAGE, name.split(">", 1)[1])(cls)
            tf.keras.utils.get_custom_objects()[name] = base


__all__ = ["PACKAGE", "SavedAsBase", "registered", "registered_schedule"]
