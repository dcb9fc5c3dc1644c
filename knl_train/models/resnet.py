"""ResNet-50 v1, v1.5 and v2 on ImageNet: ``tf.keras.applications``, weights=None.

* ``resnet50``: ``tf.keras.applications.ResNet50``: **25,636,712** parameters at 1000 classes as
  Keras counts them (25,583,592 trainable + 53,120 BN moving mean/variance). The published
  25.6M / **25,557,032** (torchvision, Caffe ResNet-50 without conv biases) is the same network
  counted without BN moving statistics and without the bias Keras puts on every conv (26,560
  biases, redundant before BN): 25,583,592 - 26,560 = 25,557,032. Tests check both numbers.
* ``resnet50_v1_5``: the MLPerf / NVIDIA "v1.5" variant: in each downsampling bottleneck
  (conv3_block1, conv4_block1, conv5_block1) the stride 2 moves from the first 1x1 conv
  (``*_1_conv``) to the 3x3 conv (``*_2_conv``); the 1x1 projection shortcut (``*_0_conv``)
  keeps stride 2. Built from ResNet50's own config with those two strides swapped, so layer
  names, shapes and the count (25,636,712; 25,557,032 as published) are ResNet50's. Keras'
  3x3 conv pads "same", which for stride 2 pads bottom/right only (TF's MLPerf reference pads
  explicitly, PyTorch symmetrically); output sizes are the same.
* ``resnet50_v2``: ``tf.keras.applications.ResNet50V2`` (pre-activation): 25,613,800 parameters.

All three: channels-last, float32, no kernel regularizers (LARS carries the weight decay,
lars.md §2.1), Keras' BatchNormalization defaults as ``keras.applications`` sets them
(momentum 0.99, epsilon 1.001e-5), and logits out (``classifier_activation=None``: the
trainer's loss is ``from_logits=True``). ``keras.applications`` needs ``image_size >= 32``.
"""

from __future__ import annotations

import tensorflow as tf

from knl_train.models.registry import register

apps = tf.keras.applications

# The bottlenecks whose first block downsamples (conv2_block1 has stride 1 after the max pool).
DOWNSAMPLING_BLOCKS = ("conv3_block1", "conv4_block1", "conv5_block1")


def _app_kwargs(num_classes, image_size, kwargs):
    return {"weights": None, "include_top": True, "classes": num_classes,
            "input_shape": (image_size, image_size, 3), "classifier_activation": None, **kwargs}


@register("resnet50")
def resnet50(num_classes: int, image_size: int, **kwargs):
    """``tf.keras.applications.ResNet50(weights=None)``, logits out; 25,636,712 params (Keras)."""
    return apps.ResNet50(**_app_kwargs(num_classes, image_size, kwargs))


@register("resnet50_v1_5")
def resnet50_v1_5(num_classes: int, image_size: int, **kwargs):
    """ResNet-50 v1.5: ResNet50 with the downsampling stride on the 3x3 conv; 25,636,712 params."""
    config = resnet50(num_classes, image_size, **kwargs).get_config()
    moved = set()
    for layer in config["layers"]:
        name = layer["config"]["name"]
        block = name.rsplit("_", 2)[0]
        if block in DOWNSAMPLING_BLOCKS and name.endswith(("_1_conv", "_2_conv")):
            stride = 1 if name.endswith("_1_conv") else 2
            assert tuple(layer["config"]["strides"]) != (stride, stride), name
            layer["config"]["strides"] = (stride, stride)
            moved.add(name)
    assert len(moved) == 2 * len(DOWNSAMPLING_BLOCKS), moved
    config["name"] = "resnet50_v1_5"
    return tf.keras.Model.from_config(config)


@register("resnet50_v2")
def resnet50_v2(num_classes: int, image_size: int, **kwargs):
    """``tf.keras.applications.ResNet50V2(weights=None)`` with logits out; 25,613,800 params."""
    return apps.ResNet50V2(**_app_kwargs(num_classes, image_size, kwargs))
