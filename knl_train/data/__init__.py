"""Input pipelines: the ImageNet folder and TFRecord readers, synthetic batches, the demo dataset.

``open_source(cfg, seed=)`` gives the trainer a ``DataSource`` for ``data.format``; the readers
(``folder``, ``tfrecord``) are ``Reader``s of their ``Split``s. The exports that import
TensorFlow load on first use (PEP 562), so ``knl-train data`` and the config do without it.
"""

from knl_train.data.demo import DemoSpec, make_demo
from knl_train.data.tfrecord import to_tfrecord

__all__ = ["Augment", "DataSource", "DemoSpec", "Reader", "Split", "check_global_batch",
           "make_demo", "open_source", "to_tfrecord", "user_errors"]


def __getattr__(name: str):
    if name in ("DataSource", "Reader", "Split", "open_source"):
        from knl_train.data import source
        return getattr(source, name)
    if name in ("check_global_batch", "user_errors"):
        from knl_train.data import pipeline
        return getattr(pipeline, name)
    if name == "Augment":
        from knl_train.data.augment import Augment
        return Augment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
