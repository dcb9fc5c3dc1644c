"""The TensorFlow-free lists of names (knl_train/optim/names.py): each list is its Literal type,
every module checks against the same lists, and the config and recipes load without TensorFlow."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from knl_train.optim import names
from knl_train.train import config as train_config


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
