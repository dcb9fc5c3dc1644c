"""Rank-0 checkpoints: atomic, rotated, and consistent with latest.json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from knl_train.errors import UserError
from knl_train.models import build
from knl_train.optim import LARS
from knl_train.train.checkpoint import CheckpointManager, latest_state


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


def _steps(directory):
    return sorted(p.name for p in directory.glob("step-*"))


def test_keeps_the_last_k_and_latest_points_at_the_newest(tmp_path, model_and_opt):
    mgr = CheckpointManager(tmp_path, *model_and_opt, keep=2)
    for epoch in (1, 2, 3):
        mgr.save(epoch * 10, {"epoch": epoch, "batch": 0})
    assert _steps(tmp_path) == ["step-00000020", "step-00000030"]
    latest = {"name": "step-00000030", "step": 30, "epoch": 3, "batch": 0}
    assert json.loads((tmp_path / "latest.json").read_text()) == latest
    assert latest_state(tmp_path) == latest
    # The state also sits beside the checkpoint it describes.
    assert json.loads((tmp_path / "step-00000030" / "state.json").read_text()) == latest
    assert mgr.latest() == tmp_path / "step-00000030"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_new_run_in_the_same_directory_supersedes_the_old_checkpoints(tmp_path, model_and_opt):
    old = CheckpointManager(tmp_path, *model_and_opt, keep=3)
    for step in (30, 40, 50):
        old.save(step)
    new = CheckpointManager(tmp_path, *model_and_opt, keep=3)
    new.save(10)
    assert _steps(tmp_path) == ["step-00000010"]
    assert new.latest() == tmp_path / "step-00000010" and new.latest().is_dir()


def test_latest_json_without_its_checkpoint_is_no_checkpoint(tmp_path, model_and_opt):
    assert latest_state(tmp_path) is None
    mgr = CheckpointManager(tmp_path, *model_and_opt)
    mgr.save(10)
    shutil.rmtree(tmp_path / "step-00000010")
    assert latest_state(tmp_path) is None and mgr.latest() is None


def test_restore_round_trips_weights_slots_and_step(tmp_path, model_and_opt):
    model, opt = model_and_opt
    mgr = CheckpointManager(tmp_path, model, opt)
    saved = [v.numpy().copy() for v in model.variables + opt.variables()]
    assert int(opt.iterations.numpy()) == 1
    mgr.save(1)
    for v in model.trainable_variables + opt.variables():
        v.assign(tf.zeros_like(v))
    mgr.restore(mgr.latest())
    restored = [v.numpy() for v in model.variables + opt.variables()]
    assert all(np.array_equal(a, b) for a, b in zip(saved, restored))
    assert int(opt.iterations.numpy()) == 1


def test_a_failed_write_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, model_and_opt):
    mgr = CheckpointManager(tmp_path, *model_and_opt)
    mgr.save(10)
    # A file where the next checkpoint's temporary directory must go: the write fails
    # (independent of permissions, so it fails as root too).
    (tmp_path / ".step-00000020.tmp").write_text("in the way")
    with pytest.raises(UserError, match=r"could not write checkpoint .*step-00000020.*previous checkpoint "
                                        r"\(.*step-00000010\) is intact"):
        mgr.save(20)
    assert _steps(tmp_path) == ["step-00000010"]
    assert json.loads((tmp_path / "latest.json").read_text())["name"] == "step-00000010"
    assert (tmp_path / ".step-00000020.tmp").read_text() == "in the way"
