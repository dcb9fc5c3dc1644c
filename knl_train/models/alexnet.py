"""AlexNet (BVLC, with LRN) and AlexNet-BN (BN in place of LRN), the LARS papers' AlexNets.

Which variant, exactly
----------------------
``alexnet`` follows Caffe's ``models/bvlc_alexnet/train_val.prototxt`` (the net the LARS papers
and Intel Caffe trained): conv1 96x11x11/4 → ReLU → LRN → max-pool 3/2 → conv2 256x5x5 pad 2,
**2 groups** → ReLU → LRN → pool → conv3 384x3x3 → conv4 384x3x3, 2 groups → conv5 256x3x3,
2 groups → pool → fc6 4096 → dropout 0.5 → fc7 4096 → dropout 0.5 → fc8. The grouped convs
(the two-GPU towers of Krizhevsky et al. 2012) are what give the published count:
**60,965,224 parameters at 1000 classes** (an ungrouped single-tower net would have 62,378,344).
LRN is Caffe's ``local_size 5, alpha 1e-4, beta 0.75, k 1``, i.e.
``tf.nn.local_response_normalization(depth_radius=2, bias=1, alpha=1e-4/5, beta=0.75)``.
Initialisation is BVLC's: gaussian std 0.01 (fc6/fc7: 0.005), biases 0 or 0.1 as in the prototxt.

``alexnet_bn`` follows the LARS co-author's
``borisgin/nvcaffe:models/alexnet_bn/train_val.prototxt``
("Alexnet with BatchNorm instead of LRN"): conv → BN (with scale and shift) → ReLU → pool, no
LRN, the same grouped convs, conv1-conv4 without bias, conv5 *with* bias (a quirk of that file,
kept so the count matches it). **60,969,608 parameters at 1000 classes** (Keras counts BN moving
mean/variance: 60,966,856 trainable + 2,752 non-trainable). BN uses Keras defaults (momentum
0.99, epsilon 1e-3); the NVCaffe file uses ``moving_average_fraction 0.9, eps 1e-4``: pass
``bn_momentum=0.9, bn_epsilon=1e-4`` to match it.

Image size
----------
Max pooling uses Caffe's ceil rounding (``ceil((H - 3) / 2) + 1``), so 227 px *and* 224 px both
give pool5 = 6x6x256 = 9216 features, as in Caffe. For smaller images (32-64 px, tests and
demos) a pool whose input is smaller than its 3x3 window pools the whole map, and when pool5 is
not 6x6 an adaptive average pool (PyTorch ``AdaptiveAvgPool2d`` bins) maps it to 6x6, so fc6
always sees 9216 features and the parameter count does not depend on ``image_size``.

Channels-last; no kernel regularizers (LARS carries the weight decay); outputs are logits.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from knl_train.models.registry import register

layers = tf.keras.layers

POOL5 = 6  # pool5's spatial size in BVLC AlexNet at 227 px (fc6 input: 6 * 6 * 256 = 9216)


class LRN(layers.Layer):
    """Caffe ACROSS_CHANNELS local response normalization: x / (k + alpha/n * sum x^2)^beta."""

    def __init__(self, local_size=5, alpha=1e-4, beta=0.75, k=1.0, **kwargs):
        super().__init__(**kwargs)
        self.local_size, self.alpha, self.beta, self.k = local_size, alpha, beta, k

    def call(self, x):
        return tf.nn.local_response_normalization(
            x, depth_radius=self.local_size // 2, bias=self.k,
            alpha=self.alpha / self.local_size, beta=self.beta)

    def get_config(self):
        return {**super().get_config(), "local_size": self.local_size, "alpha": self.alpha,
                "beta": self.beta, "k": self.k}


class AdaptiveAvgPool2D(layers.Layer):
    """Average pooling to a fixed ``size x size`` output, with PyTorch's adaptive bins.

    Bin i covers rows ``floor(i*H/size)`` to ``ceil((i+1)*H/size)``; for H < size bins repeat
    rows. Implemented as two constant pooling matrices (static shapes, no parameters).
    """

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    @staticmethod
    def _matrix(n_in, n_out):
        m = np.zeros((n_out, n_in), np.float32)
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m

    def build(self, input_shape):
        self._ph = tf.constant(self._matrix(int(input_shape[1]), self.size))
        self._pw = tf.constant(self._matrix(int(input_shape[2]), self.size))
        super().build(input_shape)

    def call(self, x):
        return tf.einsum("ih,bhwc,jw->bijc", self._ph, x, self._pw)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


def _caffe_max_pool(x, name):
    """Caffe's 3x3/2 max pool (ceil rounding); inputs smaller than 3x3 are pooled whole.

    Pool inputs follow a ReLU (>= 0), so padding the bottom/right edge with zeros leaves every
    window's maximum unchanged.
    """
    h = int(x.shape[1])
    if h < 3:
        return layers.MaxPool2D(h, 1, name=name)(x)
    out = math.ceil((h - 3) / 2) + 1
    pad = (out - 1) * 2 + 3 - h
    if pad:
        x = layers.ZeroPadding2D(((0, pad), (0, pad)), name=f"{name}_ceilpad")(x)
    return layers.MaxPool2D(3, 2, name=name)(x)


def _gauss(std):
    return tf.keras.initializers.RandomNormal(stddev=std)


def _const(v):
    return tf.keras.initializers.Constant(v)


def _alexnet(num_classes, image_size, bn, name, dropout=0.5, bn_momentum=0.99, bn_epsilon=1e-3):
    # (filters, kernel, stride, groups, bias init or None for no bias) for conv1..conv5.
    # BVLC biases: 0, 0.1, 0, 0.1, 0.1. NVCaffe alexnet_bn: no bias except conv5 (0.1).
    convs = [(96, 11, 4, 1, 0.0), (256, 5, 1, 2, 0.1), (384, 3, 1, 1, 0.0),
             (384, 3, 1, 2, 0.1), (256, 3, 1, 2, 0.1)]
    if bn:
        convs = [c[:4] + ((0.1,) if i == 4 else (None,)) for i, c in enumerate(convs)]
    inputs = tf.keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for i, (filters, kernel, stride, groups, bias) in enumerate(convs, start=1):
        x = layers.Conv2D(filters, kernel, strides=stride, groups=groups,
                          padding="valid" if i == 1 else "same", use_bias=bias is not None,
                          kernel_initializer=_gauss(0.01),
                          bias_initializer=_const(bias or 0.0), name=f"conv{i}")(x)
        if bn:
            x = layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon,
                                          name=f"conv{i}_bn")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        if not bn and i in (1, 2):
            x = LRN(name=f"norm{i}")(x)
        if i in (1, 2, 5):
            x = _caffe_max_pool(x, f"pool{i}")
    if int(x.shape[1]) != POOL5:
        x = AdaptiveAvgPool2D(POOL5, name="pool5_adaptive")(x)
    x = layers.Flatten(name="flatten")(x)
    for i in (6, 7):
        x = layers.Dense(4096, activation="relu", kernel_initializer=_gauss(0.005),
                         bias_initializer=_const(0.1), name=f"fc{i}")(x)
        x = layers.Dropout(dropout, name=f"drop{i}")(x)
    outputs = layers.Dense(num_classes, kernel_initializer=_gauss(0.01), name="fc8")(x)
    return tf.keras.Model(inputs, outputs, name=name)


@register("alexnet")
def alexnet(num_classes: int, image_size: int, dropout: float = 0.5):
    """BVLC AlexNet with LRN and 2-group conv2/4/5: 60,965,224 parameters at 1000 classes."""
    return _alexnet(num_classes, image_size, bn=False, name="alexnet", dropout=dropout)


@register("alexnet_bn")
def alexnet_bn(num_classes: int, image_size: int, dropout: float = 0.5,
               bn_momentum: float = 0.99, bn_epsilon: float = 1e-3):
    """NVCaffe AlexNet-BN (BN after each conv, no LRN): 60,969,608 parameters at 1000 classes.

    BN momentum/epsilon default to Keras' (0.99 / 1e-3); NVCaffe's file uses 0.9 / 1e-4.
    """
    return _alexnet(num_classes, image_size, bn=True, name="alexnet_bn", dropout=dropout,
                    bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)
