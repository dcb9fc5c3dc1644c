"""LR and warmup scaling from a reference batch (knl_train/optim/scaling.py): Goyal's linear rule,
the square-root rule, You et al.'s LEGW warmup, checked against the NUS ResNet-50 table."""

from __future__ import annotations

import math

import pytest

from knl_train.optim.scaling import (SCALING_RULES, batch_ratio, legw_warmup_epochs,
                                     scale_learning_rate, scale_schedule)


def test_linear_rule_goyal():
    # Goyal et al.: η = 0.1·kn/256, so 0.1 at 256 is 3.2 at 8192 (k = 32).
    assert scale_learning_rate(0.1, 256, 8192, "linear") == pytest.approx(3.2, rel=1e-12)
    assert scale_learning_rate(0.1, 256, 8192) == pytest.approx(3.2, rel=1e-12)  # the default
    assert scale_learning_rate(3.2, 8192, 256, "linear") == pytest.approx(0.1, rel=1e-12)
    assert scale_learning_rate(0.1, 256, 32768, "linear") == pytest.approx(12.8, rel=1e-12)


def test_sqrt_rule():
    assert scale_learning_rate(0.1, 256, 8192, "sqrt") == pytest.approx(0.1 * math.sqrt(32),
                                                                        rel=1e-12)
    assert scale_learning_rate(0.1, 256, 8192, "sqrt") == pytest.approx(0.565685424949, rel=1e-10)
    assert scale_learning_rate(4.0, 512, 8192, "sqrt") == pytest.approx(16.0, rel=1e-12)


def test_none_rule_and_same_batch():
    assert scale_learning_rate(0.1, 256, 8192, "none") == 0.1
    for rule in SCALING_RULES:
        assert scale_learning_rate(0.7, 1024, 1024, rule) == pytest.approx(0.7, rel=1e-12)


def test_legw_warmup_grows_linearly_with_the_batch():
    assert legw_warmup_epochs(10 / 64, 512, 8192) == pytest.approx(2.5, rel=1e-12)
    assert legw_warmup_epochs(2.5, 8192, 32768) == pytest.approx(10.0, rel=1e-12)
    assert legw_warmup_epochs(5, 1024, 512) == pytest.approx(2.5, rel=1e-12)
    assert legw_warmup_epochs(0, 256, 8192) == 0.0


@pytest.mark.parametrize("batch, lr, warmup", [
    (1024, 2 ** 2.5, 10 / 2 ** 5),
    (4096, 2 ** 3.5, 10 / 2 ** 3),
    (8192, 2 ** 4, 10 / 2 ** 2),
])
def test_legw_reproduces_the_nus_resnet50_table(batch, lr, warmup):
    """lars.md §5: from B=512 (LR 2^2, 10/2^6 epochs), √B LR and B-linear warmup give the table."""
    got = scale_schedule(4.0, 10 / 64, 512, batch, rule="sqrt", warmup_rule="legw")
    assert got.peak_lr == pytest.approx(lr, rel=1e-12)
    assert got.warmup_epochs == pytest.approx(warmup, rel=1e-12)


def test_scale_schedule_goyal_keeps_the_warmup():
    got = scale_schedule(0.1, 5, 256, 8192, rule="linear")
    assert got == pytest.approx((3.2, 5.0))
    assert scale_schedule(0.1, 5, 256, 8192, rule="linear", warmup_rule="legw").warmup_epochs == 160


def test_batch_ratio():
    assert batch_ratio(256, 8192) == 32.0
    assert batch_ratio(512, 8192.0) == 16.0


@pytest.mark.parametrize("call, arg", [
    (lambda: scale_learning_rate(0.0, 256, 8192), "base_lr"),
    (lambda: scale_learning_rate(-0.1, 256, 8192), "base_lr"),
    (lambda: scale_learning_rate(float("nan"), 256, 8192), "base_lr"),
    (lambda: scale_learning_rate(float("inf"), 256, 8192), "base_lr"),
    (lambda: scale_learning_rate("0.1", 256, 8192), "base_lr"),
    (lambda: scale_learning_rate(0.1, 0, 8192), "base_batch"),
    (lambda: scale_learning_rate(0.1, -256, 8192), "base_batch"),
    (lambda: scale_learning_rate(0.1, 256, 0), "batch"),
    (lambda: scale_learning_rate(0.1, 256, True), "batch"),
    (lambda: scale_learning_rate(0.1, 256, 100.5), "batch"),
    (lambda: legw_warmup_epochs(-1, 256, 8192), "base_warmup_epochs"),
    (lambda: legw_warmup_epochs(5, 256, -8192), "batch"),
    (lambda: scale_schedule(0.1, -5, 256, 8192), "warmup_epochs"),
])
def test_invalid_inputs_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        call()


def test_unknown_rules_list_the_rules():
    with pytest.raises(ValueError, match=r"'cubic'.*linear, sqrt, none"):
        scale_learning_rate(0.1, 256, 8192, "cubic")
    with pytest.raises(ValueError, match=r"'goyal'.*constant, legw"):
        scale_schedule(0.1, 5, 256, 8192, warmup_rule="goyal")
