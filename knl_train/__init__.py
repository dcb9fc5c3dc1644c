"""knl-train: large-batch data-parallel CNN training on CPU supercomputers.

The library's entry points: the optimizers ``LARS`` and ``LAMB``, ``build_model(name,
num_classes, image_size)`` (``knl_train.models.build``) and ``run_training(cfg)``
(``knl_train.train.trainer.run``). They import TensorFlow, so they load on first use (PEP 562):
``import knl_train`` alone stays light enough for configs, presets and studies.
"""

__version__ = "0.1.0"

__all__ = ["LAMB", "LARS", "__version__", "build_model", "run_training"]


def __getattr__(name: str):
    if name in ("LARS", "LAMB"):
        from knl_train import optim
        return getattr(optim, name)
    if name == "build_model":
        from knl_train.models import build
        return build
    if name == "run_training":
        from knl_train.train.trainer import run
        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
