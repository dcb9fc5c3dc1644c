"""Small CNNs for 32-64 px images: CPU tests and demos."""

from __future__ import annotations

import tensorflow as tf

from knl_train.models.registry import register

layers = tf.keras.layers


def _conv_bn_relu(x, filters, stride, name):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # Momentum 0.9, not Keras' 0.99: demo and test runs are a few hundred steps, too short for
    # 0.99's moving statistics to converge, which makes inference-mode evaluation look random.
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


@register("small_cnn")
def small_cnn(num_classes: int, image_size: int, width: int = 32):
    """Four conv-BN-ReLU blocks (two with stride 2), global pooling, a dense classifier."""
    inputs = tf.keras.Input((image_size, image_size, 3), name="image")
    x = _conv_bn_relu(inputs, width, 1, "block1")
    x = _conv_bn_relu(x, width, 2, "block2")
    x = _conv_bn_relu(x, 2 * width, 2, "block3")
    x = _conv_bn_relu(x, 2 * width, 1, "block4")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="small_cnn")


class ZeroPadShortcut(layers.Layer):
    """He et al.'s option-A shortcut: subsample spatially by ``stride``, zero-pad the channels."""

    def __init__(self, filters: int, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.stride = filters, stride

    def call(self, x):
        x = x[:, ::self.stride, ::self.stride, :]
        extra = self.filters - x.shape[-1]
        return tf.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


def _basic_block(x, filters, stride, name, bn_momentum):
    init = "he_normal"
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = ZeroPadShortcut(filters, stride, name=f"{name}_shortcut")(x)
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                      kernel_initializer=init, name=f"{name}_1_conv")(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_1_bn")(x)
    x = layers.ReLU(name=f"{name}_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init,
                      name=f"{name}_2_conv")(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_2_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.ReLU(name=f"{name}_out")(x)


@register("resnet20")
def resnet20(num_classes: int, image_size: int, blocks: int = 3, bn_momentum: float = 0.9):
    """CIFAR ResNet-20 (He et al. 2016, §4.2) for 32-64 px: 271,098 parameters at 10 classes.

    A 3x3/16 conv, then 3 stages of ``blocks`` basic blocks with 16/32/64 filters (stride 2
    at the start of stages 2 and 3), global average pooling, a dense classifier (logits).
    Shortcuts are the paper's option A (parameter-free: subsample and zero-pad channels), which
    gives its 0.27M (269,722 trainable + 1,376 BN moving statistics; ``blocks=5`` is ResNet-32,
    etc.). BN momentum 0.9 for the same reason as ``small_cnn``: short runs.
    """
    inputs = tf.keras.Input((image_size, image_size, 3), name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                      name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, blocks + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters, stride, f"stage{stage}_block{block}", bn_momentum)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name=f"resnet{6 * blocks + 2}")
