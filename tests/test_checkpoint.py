"""Rank-0 checkpoints: atomic, rotated, and consistent with latest.json."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from knl_train.errors import UserError
from knl_train.models import build
from knl_train.optim import LARS
from knl_train.train.checkpoint import CheckpointManager


@pytest.fixture()
def model_and_opt():
    tf.keras.utils.set_random_seed(0)
    model = build("small_cnn", num_classes=3, image_size=8)
    opt = LARS(0.5)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    y = np.array([0, 1, 2, 0])
    model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, y)  # creates the optimizer's slots
    return model, opt


def _epochs(directory):
    return sorted(p.name for p in directory.glob("epoch-*"))


def test_keeps_the_last_k_and_latest_points_at_the_newest(tmp_path, model_and_opt):
    mgr = CheckpointManager(tmp_path, *model_and_opt, keep=2)
    for epoch in (1, 2, 3):
        mgr.save(epoch, epoch * 10)
    assert _epochs(tmp_path) == ["epoch-0002", "epoch-0003"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"name": "epoch-0003", "epoch": 3, "step": 30}
    assert mgr.latest() == tmp_path / "epoch-0003"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_new_run_in_the_same_directory_supersedes_the_old_checkpoints(tmp_path, model_and_opt):
    old = CheckpointManager(tmp_path, *model_and_opt, keep=3)
    for epoch in (3, 4, 5):
        old.save(epoch, epoch * 10)
    new = CheckpointManager(tmp_path, *model_and_opt, keep=3)
    new.save(1, 10)
    assert _epochs(tmp_path) == ["epoch-0001"]
    assert new.latest() == tmp_path / "epoch-0001" and new.latest().is_dir()


def test_restore_round_trips_weights_and_slots(tmp_path, model_and_opt):
    model, opt = model_and_opt
    mgr = CheckpointManager(tmp_path, model, opt)
    saved = [v.numpy().copy() for v in model.variables + opt.variables()]
    mgr.save(1, 1)
    for v in model.trainable_variables:
        v.assign(tf.zeros_like(v))
    mgr.restore(mgr.latest())
    restored = [v.numpy() for v in model.variables + opt.variables()]
    assert all(np.array_equal(a, b) for a, b in zip(saved, restored))


def test_a_failed_write_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, model_and_opt):
    mgr = CheckpointManager(tmp_path, *model_and_opt)
    mgr.save(1, 10)
    # A file where the next checkpoint's temporary directory must go: the write fails
    # (independent of permissions, so it fails as root too).
    (tmp_path / f".epoch-0002.tmp-{os.getpid()}").write_text("in the way")
    with pytest.raises(UserError, match=r"could not write checkpoint .*epoch-0002.*previous checkpoint "
                                        r"\(.*epoch-0001\) is intact"):
        mgr.save(2, 20)
    assert _epochs(tmp_path) == ["epoch-0001"]
    assert json.loads((tmp_path / "latest.json").read_text())["name"] == "epoch-0001"
