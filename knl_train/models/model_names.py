"""The one list of model names, without TensorFlow.

A study checks its training config's ``model`` against it when it renders, before TensorFlow
is ever imported; the registry asserts on first use that it registers exactly these. (Not
``names.py``: ``knl_train.models.names`` is the registry's function.)
"""

from __future__ import annotations

MODEL_NAMES = ("alexnet", "alexnet_bn", "resnet20", "resnet50", "resnet50_v1_5", "resnet50_v2",
               "small_cnn")

__all__ = ["MODEL_NAMES"]
