"""Keras's own model files with knl-train's optimizers and schedules in them.

Every optimizer (LARS, LAMB, SGD) and schedule is registered with Keras when its module is
imported (:mod:`knl_train.optim.keras_names`, which also covers Horovod's wrapped optimizers:
they load as the plain ones). This module imports them all, and so does the first
``from knl_train.optim import X`` of a TensorFlow export, or :func:`register_keras_objects`.
After that ``tf.keras.models.load_model`` needs no ``custom_objects``. ``import knl_train``
alone does not register them: it must not import TensorFlow (the CLI and the config load
without it), and Keras has no hook that would import them on demand.

What each format keeps, for legacy Keras optimizers (Horovod's kind) under Keras 2.15:

``.h5``         weights, optimizer config and state (iterations, slots): training continues
                exactly where it stopped.
SavedModel      weights and config. The state is in the directory, but Keras's loader reads it
                into a placeholder optimizer and then compiles a fresh one from the config
                (warning "Slots cannot be restored from saved_model"), for stock SGD too.
                :func:`load_model` restores it from the SavedModel's checkpoint. The trust
                ratios are not saved (see ``ExclusionMixin.get_slot_names``).
``.keras``      weights and config only: Keras 2.15 writes the state of new-style optimizers
                alone (``saving_lib._is_keras_trackable``), so every legacy optimizer, stock SGD
                included, starts again at iteration 0 with empty slots.
"""

from __future__ import annotations

import os
from typing import Tuple

import tensorflow as tf

# Imported for their registration with Keras: every optimizer and schedule.
from knl_train.optim import keras_names, registry, schedules  # noqa: F401


def register_keras_objects() -> Tuple[str, ...]:
    """The names under which Keras knows knl-train's optimizers and schedules.

    Importing this module registered them (it imports ``registry`` and ``schedules``); calling
    this makes the intent visible in a script that only loads a model."""
    objects = tf.keras.utils.get_custom_objects()
    return tuple(sorted(name for name in objects if name.startswith(f"{keras_names.PACKAGE}>")))


def is_saved_model(path) -> bool:
    """True for a SavedModel directory (what ``model.save(dir)`` writes)."""
    return os.path.isfile(os.path.join(str(path), "saved_model.pb"))


def load_model(path, **kwargs):
    """``tf.keras.models.load_model(path, **kwargs)``, and for a SavedModel the optimizer's
    iterations and slots too, so training goes on as it would have without the save.

    The slots are created and filled at once (Keras would otherwise create them at the first
    step), so they can be read right after loading."""
    register_keras_objects()
    model = tf.keras.models.load_model(path, **kwargs)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not is_saved_model(path):
        return model
    # The SavedModel's checkpoint has the model as its root and the optimizer as its child
    # "optimizer"; slots wait in the checkpoint until created, which the next line does.
    prefix = os.path.join(str(path), "variables", "variables")
    tf.train.Checkpoint(root=model).restore(prefix).expect_partial()
    optimizer._create_all_weights(model.trainable_variables)
    return model


__all__ = ["is_saved_model", "load_model", "register_keras_objects"]
