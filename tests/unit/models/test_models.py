"""What every network of knl_train.models shares: published parameter counts at 1000 classes,
forward passes at small sizes, channels-last float32 logits with no L2, serialisable layers.
``big`` (each big network built once per module) is in tests/conftest.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from knl_train import models

ALL = ["alexnet", "alexnet_bn", "resnet20", "resnet50", "resnet50_v1_5", "resnet50_v2", "small_cnn"]
BIG = ["alexnet", "alexnet_bn", "resnet50", "resnet50_v1_5", "resnet50_v2"]
SMALL = ["small_cnn", "resnet20"]

# (total as Keras counts it, trainable) at 1000 classes, 224 px.
# alexnet: BVLC bvlc_alexnet (grouped conv2/4/5), the published 60,965,224.
# alexnet_bn: NVCaffe models/alexnet_bn (no LRN, BN after each conv, conv5 keeps its bias).
# resnet50(_v1_5): Keras ResNet50 = published 25,557,032 + 26,560 conv biases + BN moving stats.
# resnet50_v2: Keras ResNet50V2.
COUNTS = {
    "alexnet": (60_965_224, 60_965_224),
    "alexnet_bn": (60_969_608, 60_966_856),
    "resnet50": (25_636_712, 25_583_592),
    "resnet50_v1_5": (25_636_712, 25_583_592),
    "resnet50_v2": (25_613_800, 25_568_360),
}


def n_params(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


@pytest.mark.parametrize("name", BIG)
def test_published_parameter_counts_at_1000_classes(big, name):
    m = big(name)
    assert (m.count_params(), n_params(m.trainable_weights)) == COUNTS[name]
    assert m.output_shape == (None, 1000)


@pytest.mark.parametrize("name", ["alexnet", "alexnet_bn"])
def test_alexnet_params_do_not_depend_on_image_size(name):
    m = models.build(name, num_classes=1000, image_size=32)
    assert m.count_params() == COUNTS[name][0]
    assert m.get_layer("flatten").output_shape == (None, 9216)


@pytest.mark.parametrize("name,size", [(n, s) for n in SMALL for s in (32, 64)]
                         + [("alexnet_bn", 32)])
def test_forward_pass_at_small_sizes(name, size):
    m = models.build(name, num_classes=10, image_size=size)
    x = tf.random.uniform((2, size, size, 3))
    for training in (False, True):
        y = m(x, training=training)
        assert y.shape == (2, 10) and y.dtype == tf.float32
        assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize("name", ALL)
def test_channels_last_float32_no_regularizers(big, name):
    m = big(name) if name in BIG else models.build(name, num_classes=10, image_size=32)
    assert m.input_shape[-1] == 3
    assert m.losses == []
    for layer in m.layers:
        for attr in ("kernel_regularizer", "bias_regularizer", "depthwise_regularizer",
                     "beta_regularizer", "gamma_regularizer", "activity_regularizer"):
            assert getattr(layer, attr, None) is None, (layer.name, attr)
        if hasattr(layer, "data_format"):
            assert layer.data_format == "channels_last", layer.name
    assert {w.dtype for w in m.weights} == {tf.float32}
    assert m.output.dtype == tf.float32
    if m.layers[-1].get_config().get("activation") is not None:
        assert m.layers[-1].get_config()["activation"] == "linear"  # logits


def test_custom_layers_serialise():
    for name in ("alexnet", "resnet20"):
        m = models.build(name, num_classes=10, image_size=32)
        custom = {type(layer).__name__: type(layer) for layer in m.layers
                  if type(layer).__module__.startswith("knl_train")}
        clone = tf.keras.Model.from_config(m.get_config(), custom_objects=custom)
        assert clone.count_params() == m.count_params()
