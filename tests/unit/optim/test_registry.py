"""The optimizer registry (knl_train/optim/registry.py): it holds exactly the names of
knl_train/optim/names.py, and every registered optimizer builds and takes a step."""

from __future__ import annotations

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
