"""The optimizer registry (knl_train/optim/registry.py) against the TensorFlow-free list of
names (knl_train/optim/names.py) that the training config validates with."""

from __future__ import annotations

import subprocess
import sys
import typing

import numpy as np
import pytest
import tensorflow as tf

from knl_train.errors import UserError
from knl_train.optim import names, registry
from knl_train.train import config as train_config
from knl_train.train.config import OptimizerConfig


def test_registry_holds_exactly_the_listed_names():
    assert registry.names() == tuple(sorted(names.OPTIMIZER_NAMES))
    assert set(registry.describe()) == set(names.OPTIMIZER_NAMES)


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_optimizer_builds_and_steps(name):
    opt = registry.build_optimizer(OptimizerConfig(name=name), learning_rate=0.1)
    assert isinstance(opt, tf.keras.optimizers.legacy.Optimizer)
    assert registry.describe()[name]  # a one-line description for listings
    var = tf.Variable(tf.ones((4, 3)), name="dense/kernel")
    opt.apply_gradients([(tf.fill((4, 3), 0.5), var)])
    assert np.all(np.isfinite(var.numpy())) and not np.allclose(var.numpy(), 1.0)
    assert train_config.load(None, [f"optimizer.name={name}"]).optimizer.name == name


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="unknown optimizer 'lasr' .did you mean lars"):
        registry.OPTIMIZERS.lookup("lasr")
    with pytest.raises(UserError, match="optimizer.name: 'lasr' is not allowed; choose one of lars"):
        train_config.load(None, ["optimizer.name=lasr"])


@pytest.mark.parametrize("alias, values", [
    (names.OptimizerName, names.OPTIMIZER_NAMES), (names.LarsVariant, names.VARIANTS),
    (names.ScheduleKind, names.SCHEDULE_KINDS), (names.DecayMode, names.DECAY_MODES),
    (names.ScalingRule, names.SCALING_RULES), (names.WarmupRule, names.WARMUP_RULES),
    (names.Compression, names.COMPRESSIONS),
])
def test_each_list_is_its_literal_type(alias, values):
    assert typing.get_args(alias) == values and len(set(values)) == len(values)


def test_modules_check_against_the_same_lists():
    from knl_train.optim import lars, scaling, schedules
    assert lars.VARIANTS is names.VARIANTS and scaling.SCALING_RULES is names.SCALING_RULES
    assert schedules.SCHEDULE_KINDS is names.SCHEDULE_KINDS
    hints = typing.get_type_hints(train_config.ScheduleConfig)
    assert typing.get_args(hints["kind"]) == names.SCHEDULE_KINDS


def test_config_and_recipes_load_without_tensorflow():
    code = ("import sys, knl_train.optim.names, knl_train.optim.recipes, knl_train.train.config as c; "
            "c.load(None, ['recipe=resnet50_8k_nus']); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
