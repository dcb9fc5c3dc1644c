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
