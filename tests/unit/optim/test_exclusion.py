"""Exclusion rules (knl_train/optim/exclusion.py): the rank<=1 default, regexes that replace it,
the token that adds it back, and matching without TF's ":0" suffix."""

from __future__ import annotations

import tensorflow as tf

from knl_train.optim.exclusion import RANK_LE_1, ExclusionRule


def test_exclusion_rule_semantics():
    scalar = tf.Variable(1.0, name="block/scale")
    bias = tf.Variable(tf.zeros(3), name="conv1_bn/gamma")
    kernel = tf.Variable(tf.zeros((2, 3)), name="head/kernel")
    conv = tf.Variable(tf.zeros((3, 3, 2, 4)), name="conv1/kernel")

    default = ExclusionRule.from_config(None)
    assert default.patterns == (RANK_LE_1,)
    assert [default.matches(v) for v in (scalar, bias, kernel, conv)] == [True, True, False, False]

    empty = ExclusionRule.from_config([])
    assert empty.patterns == ()
    assert not any(empty.matches(v) for v in (scalar, bias, kernel, conv))

    # A list of regexes replaces the default ...
    head = ExclusionRule.from_config(["^head/"])
    assert [head.matches(v) for v in (scalar, bias, kernel, conv)] == [False, False, True, False]
    # ... the token adds the default back, and a bare string is one pattern.
    both = ExclusionRule.from_config([RANK_LE_1, "head"])
    assert [both.matches(v) for v in (scalar, bias, kernel, conv)] == [True, True, True, False]
    assert ExclusionRule.from_config("conv1/").patterns == ("conv1/",)
    assert ExclusionRule.from_config("conv1/").matches(conv)
    # re.search, not re.match: a pattern can match the middle of a name.
    assert ExclusionRule.from_config(["_bn/"]).matches(bias)
    # Names are matched without TF's ":0" suffix, so an anchored pattern works.
    assert kernel.name == "head/kernel:0"
    assert ExclusionRule.from_config(["kernel$"]).matches(kernel)
    assert not ExclusionRule.from_config(["kernel:0$"]).matches(kernel)
