"""The ResNets (knl_train/models/resnet.py): ResNet-50 against its published count, v1.5's
strides on the 3x3 convolutions, ResNet-20 as the CIFAR net. ``big`` is in tests/conftest.py."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from knl_train import models
from knl_train.models.resnet import DOWNSAMPLING_BLOCKS

RESNET50_PUBLISHED = 25_557_032  # torchvision / Caffe: no conv biases, no BN moving statistics


def n_params(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def test_resnet50_matches_published_count_without_conv_biases(big):
    m = big("resnet50")
    conv_biases = [w for layer in m.layers if isinstance(layer, tf.keras.layers.Conv2D)
                   for w in layer.weights if "bias" in w.name]
    assert n_params(conv_biases) == 26_560
    assert n_params(m.trainable_weights) - n_params(conv_biases) == RESNET50_PUBLISHED


def test_resnet50_v1_5_strides_sit_on_the_3x3_convs(big):
    v1, v15 = big("resnet50"), big("resnet50_v1_5")
    for block in DOWNSAMPLING_BLOCKS:
        get = lambda m, n: m.get_layer(f"{block}_{n}")  # noqa: E731
        assert get(v1, "1_conv").strides == (2, 2) and get(v1, "2_conv").strides == (1, 1)
        assert get(v15, "1_conv").strides == (1, 1) and get(v15, "2_conv").strides == (2, 2)
        assert get(v15, "2_conv").kernel_size == (3, 3)
        assert get(v15, "0_conv").strides == (2, 2)  # projection shortcut still downsamples
        # The 1x1 conv keeps the input resolution; the 3x3 halves it; the block output matches v1.
        assert get(v15, "1_conv").output_shape[1] == 2 * get(v15, "2_conv").output_shape[1]
        assert get(v15, "3_conv").output_shape == get(v1, "3_conv").output_shape
    strided = sorted(layer.name for layer in v15.layers
                     if isinstance(layer, tf.keras.layers.Conv2D) and layer.strides == (2, 2))
    assert strided == sorted(["conv1_conv"] + [f"{b}_{n}" for b in DOWNSAMPLING_BLOCKS
                                                for n in ("0_conv", "2_conv")])
    assert [w.shape for w in v15.weights] == [w.shape for w in v1.weights]
    assert v15.get_layer("conv5_block3_out").output_shape == (None, 7, 7, 2048)


def test_resnet20_is_the_cifar_net():
    m = models.build("resnet20", num_classes=10, image_size=32)
    assert (m.count_params(), n_params(m.trainable_weights)) == (271_098, 269_722)  # He: 0.27M
    convs = [layer for layer in m.layers if isinstance(layer, tf.keras.layers.Conv2D)]
    assert len(convs) + 1 == 20  # 19 convs + the classifier
    assert m.get_layer("stage3_block3_out").output_shape == (None, 8, 8, 64)
