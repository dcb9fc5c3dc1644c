"""AlexNet (knl_train/models/alexnet.py): the grouped BVLC net, its BN variant, Caffe's geometry.
``big`` is in tests/conftest.py."""

from __future__ import annotations

import pytest
import tensorflow as tf

from knl_train import models


def test_alexnet_count_is_the_grouped_bvlc_net(big):
    m = big("alexnet")
    assert [m.get_layer(f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]
    assert m.get_layer("flatten").output_shape == (None, 9216)  # pool5 6x6x256, as in Caffe
    assert [type(m.get_layer(n)).__name__ for n in ("norm1", "norm2")] == ["LRN", "LRN"]
    bn = big("alexnet_bn")
    assert not any(type(layer).__name__ == "LRN" for layer in bn.layers)
    assert sum(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in bn.layers) == 5


@pytest.mark.parametrize("size", [224, 227])
def test_alexnet_caffe_geometry(size):
    m = models.build("alexnet", num_classes=1000, image_size=size)
    assert m.get_layer("conv1").output_shape[1] == (size - 11) // 4 + 1
    assert [m.get_layer(f"pool{i}").output_shape[1] for i in (1, 2, 5)] == [27, 13, 6]
    assert "pool5_adaptive" not in [layer.name for layer in m.layers]
