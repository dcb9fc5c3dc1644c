"""The data-parallel trainer: ``run`` (``trainer``), its config (``TrainConfig``, ``load``).

``setup`` holds the pieces of a run (threads, sizes, schedule, model and optimizer), ``control``
its position, agreement and checkpoints, ``monitor`` its metrics. Importing this package (or
``train.config``) does not import TensorFlow; ``run`` does, when first asked for.
"""

from knl_train.train.config import TrainConfig, load

__all__ = ["TrainConfig", "load", "run"]


def __getattr__(name: str):
    # PEP 562: the trainer imports TensorFlow and Horovod, which a config check must not wait for.
    if name == "run":
        from knl_train.train.trainer import run
        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
