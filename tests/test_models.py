"""knl_train.models: registry, published parameter counts, shapes, v1.5 strides, no L2."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from knl_train import models
from knl_train.errors import UserError
from knl_train.models.resnet import DOWNSAMPLING_BLOCKS

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
RESNET50_PUBLISHED = 25_557_032  # torchvision / Caffe: no conv biases, no BN moving statistics


def n_params(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


@pytest.fixture(scope="module")
def big():
    """Each big model built once at 1000 classes, 224 px (graph only, never trained)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = models.build(name, num_classes=1000, image_size=224)
        return built[name]
    return get


def test_registry_lists_every_model():
    assert sorted(models.MODELS) == sorted(ALL)
    assert models.names() == tuple(sorted(ALL))
    with pytest.raises(ValueError, match="registered twice"):
        models.register("resnet20")(lambda num_classes, image_size: None)


def test_unknown_model_is_a_user_error_listing_names():
    with pytest.raises(UserError) as err:
        models.build("vgg16", num_classes=10, image_size=32)
    for name in ALL:
        assert name in str(err.value)
    with pytest.raises(UserError, match="unknown model 'resnet05' .did you mean resnet50"):
        models.build("resnet05", num_classes=10, image_size=32)


def test_kwargs_pass_through():
    m = models.build("resnet20", num_classes=10, image_size=32, blocks=5)
    assert m.name == "resnet32"
    with pytest.raises(TypeError):
        models.build("resnet20", num_classes=10, image_size=32, no_such_option=1)


@pytest.mark.parametrize("name", BIG)
def test_published_parameter_counts_at_1000_classes(big, name):
    m = big(name)
    assert (m.count_params(), n_params(m.trainable_weights)) == COUNTS[name]
    assert m.output_shape == (None, 1000)


def test_resnet50_matches_published_count_without_conv_biases(big):
    m = big("resnet50")
    conv_biases = [w for layer in m.layers if isinstance(layer, tf.keras.layers.Conv2D)
                   for w in layer.weights if "bias" in w.name]
    assert n_params(conv_biases) == 26_560
    assert n_params(m.trainable_weights) - n_params(conv_biases) == RESNET50_PUBLISHED


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


@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_builds_at_32px(name):
    m = models.build(name, num_classes=10, image_size=32)
    assert m.output_shape == (None, 10)


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


def test_resnet20_is_the_cifar_net():
    m = models.build("resnet20", num_classes=10, image_size=32)
    assert (m.count_params(), n_params(m.trainable_weights)) == (271_098, 269_722)  # He: 0.27M
    convs = [layer for layer in m.layers if isinstance(layer, tf.keras.layers.Conv2D)]
    assert len(convs) + 1 == 20  # 19 convs + the classifier
    assert m.get_layer("stage3_block3_out").output_shape == (None, 8, 8, 64)


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
