"""Rank-0 checkpoints: atomic, rotated, and consistent with latest.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from knl_train.errors import UserError
from knl_train.models import build
from knl_train.optim import LARS
from knl_train.train.checkpoint import CheckpointManager, Choice, latest_state, newest_good
from tests.support import ROOT


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


# ---- background writes (begin / wait) ------------------------------------------------------------

def _values(model, opt):
    return [v.numpy().copy() for v in model.variables + opt.variables()]


def _zero(model, opt):
    for v in model.variables + opt.variables():
        v.assign(tf.zeros_like(v))


def _tensors(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()}


@pytest.fixture()
def held_writes(monkeypatch):
    """Background checkpoint writes wait at their start until the test releases them.

    ``entered`` is set when a background write is held; ``release`` lets it go on."""
    entered, release = threading.Event(), threading.Event()
    real_write = tf.train.Checkpoint.write

    def held(self, prefix, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            assert release.wait(timeout=120), "the test never released the write"
        return real_write(self, prefix, *args, **kwargs)

    monkeypatch.setattr(tf.train.Checkpoint, "write", held)
    return entered, release


def test_begin_and_wait_write_what_save_writes_and_it_restores(tmp_path, model_and_opt):
    model, opt = model_and_opt
    saved = _values(model, opt)
    CheckpointManager(tmp_path / "now", model, opt).save(10, {"epoch": 1, "batch": 0})
    mgr = CheckpointManager(tmp_path / "later", model, opt)
    assert mgr.begin(10, {"epoch": 1, "batch": 0}) is None
    assert mgr.wait() == tmp_path / "later" / "step-00000010"
    assert mgr.wait() is None and not mgr.in_flight  # nothing left to finish
    assert mgr.last_written == mgr.latest() == tmp_path / "later" / "step-00000010"
    now, later = tmp_path / "now" / "step-00000010", tmp_path / "later" / "step-00000010"
    assert sorted(p.name for p in later.iterdir()) == sorted(p.name for p in now.iterdir()) == [
        "ckpt.data-00000-of-00001", "ckpt.index", "state.json"]
    for name in ("latest.json", "step-00000010/state.json"):
        assert (tmp_path / "later" / name).read_text() == (tmp_path / "now" / name).read_text()
    # The same keys, values and object graph (which records every variable's name): the
    # snapshot copies stand in for the live variables without a trace.
    ours, reference = _tensors(later / "ckpt"), _tensors(now / "ckpt")
    assert sorted(ours) == sorted(reference) and "_CHECKPOINTABLE_OBJECT_GRAPH" in ours
    # Every variable, the optimizer's hyperparameters (reached only through the object tree) too.
    assert len(ours) > len(model.variables) + len(opt.variables()) + 1
    assert "optimizer/learning_rate/.ATTRIBUTES/VARIABLE_VALUE" in ours
    assert all(np.array_equal(ours[k], reference[k]) for k in reference)
    _zero(model, opt)
    mgr.restore(later)
    assert all(np.array_equal(a, b) for a, b in zip(saved, _values(model, opt)))
    assert int(opt.iterations.numpy()) == 1
    assert not [p for p in (tmp_path / "later").iterdir() if p.name.startswith(".")]
    assert mgr.blocked_seconds > 0


def test_the_snapshot_holds_the_values_at_begin_while_training_goes_on(tmp_path, model_and_opt,
                                                                     held_writes):
    model, opt = model_and_opt
    entered, release = held_writes
    at_begin = _values(model, opt)
    mgr = CheckpointManager(tmp_path, model, opt)
    mgr.begin(1)
    assert entered.wait(timeout=120) and mgr.in_flight  # the write waits until released
    # A training step updates weights, slots and the iteration count in place (the LARS
    # kernel), and a plain assignment replaces a buffer: neither reaches the snapshot.
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    model.train_on_batch(x, np.array([2, 1, 0, 2]))
    model.trainable_variables[0].assign_add(tf.ones_like(model.trainable_variables[0]))
    after = _values(model, opt)
    assert int(opt.iterations.numpy()) == 2
    assert sum(not np.array_equal(a, b) for a, b in zip(at_begin, after)) >= len(model.trainable_variables)
    release.set()
    assert mgr.wait() == tmp_path / "step-00000001"
    assert all(np.array_equal(a, b) for a, b in zip(after, _values(model, opt)))  # training kept its own
    mgr.restore(mgr.last_written)
    assert all(np.array_equal(a, b) for a, b in zip(at_begin, _values(model, opt)))
    assert int(opt.iterations.numpy()) == 1


def test_a_second_begin_waits_for_the_write_in_flight(tmp_path, model_and_opt, monkeypatch):
    mgr = CheckpointManager(tmp_path, *model_and_opt)
    seen, first_held, release_first = [], threading.Event(), threading.Event()
    real_write, real_wait = tf.train.Checkpoint.write, mgr.wait

    def observed_write(self, prefix, *args, **kwargs):
        name = Path(prefix).parent.name
        seen.append(("write", name, _steps(tmp_path), (latest_state(tmp_path) or {}).get("name")))
        if name == ".step-00000010.tmp":
            first_held.set()
            assert release_first.wait(timeout=120), "the second begin never waited"
        real_write(self, prefix, *args, **kwargs)
        seen.append(("written", name))

    def observed_wait():
        # begin(20) settles the write in flight: only now may that write go on.
        seen.append(("wait", mgr.in_flight))
        release_first.set()
        return real_wait()

    monkeypatch.setattr(tf.train.Checkpoint, "write", observed_write)
    mgr.begin(10)
    assert first_held.wait(timeout=120)
    monkeypatch.setattr(mgr, "wait", observed_wait)
    mgr.begin(20)
    assert real_wait() == tmp_path / "step-00000020"
    assert seen == [
        ("write", ".step-00000010.tmp", [], None),
        ("wait", True),  # the first write was still held when the second begin came
        ("written", ".step-00000010.tmp"),
        # The second write starts once the first is complete: renamed and latest.
        ("write", ".step-00000020.tmp", ["step-00000010"], "step-00000010"),
        ("written", ".step-00000020.tmp"),
    ]
    assert _steps(tmp_path) == ["step-00000010", "step-00000020"]


def test_a_failed_background_write_is_raised_by_wait_once(tmp_path, model_and_opt):
    mgr = CheckpointManager(tmp_path, *model_and_opt)
    mgr.save(10)
    (tmp_path / ".step-00000020.tmp").write_text("in the way")  # TF cannot make its directory
    mgr.begin(20)  # the failure happens in the background
    with pytest.raises(UserError, match=r"could not write checkpoint .*step-00000020.*previous checkpoint "
                                        r"\(.*step-00000010\) is intact; free space"):
        mgr.wait()
    assert mgr.wait() is None  # reported once
    assert _steps(tmp_path) == ["step-00000010"] and mgr.last_written == tmp_path / "step-00000010"
    assert json.loads((tmp_path / "latest.json").read_text())["name"] == "step-00000010"
    assert (tmp_path / ".step-00000020.tmp").read_text() == "in the way"


def test_a_failed_background_write_is_raised_by_the_next_begin_which_writes_nothing(tmp_path, model_and_opt):
    mgr = CheckpointManager(tmp_path, *model_and_opt)
    mgr.begin(10)
    (tmp_path / "step-00000020").write_text("in the way")  # the rename into place fails
    mgr.begin(20)
    with pytest.raises(UserError, match=r"could not write checkpoint .*step-00000020.*previous checkpoint "
                                        r"\(.*step-00000010\) is intact"):
        mgr.begin(30)
    assert not mgr.in_flight and not (tmp_path / ".step-00000030.tmp").exists()
    assert json.loads((tmp_path / "latest.json").read_text())["name"] == "step-00000010"
    assert not (tmp_path / ".step-00000020.tmp").exists()  # the failed write cleaned up after itself
    (tmp_path / "step-00000020").unlink()
    mgr.begin(30)  # the run could go on: the next write works
    assert mgr.wait() == tmp_path / "step-00000030"
    assert latest_state(tmp_path)["step"] == 30


def test_background_writes_rotate(tmp_path, model_and_opt):
    mgr = CheckpointManager(tmp_path, *model_and_opt, keep=2)
    for step in (10, 20, 30, 40):
        mgr.begin(step, {"epoch": step // 10, "batch": 0})
    assert mgr.wait() == tmp_path / "step-00000040"
    assert _steps(tmp_path) == ["step-00000030", "step-00000040"]
    assert latest_state(tmp_path) == {"name": "step-00000040", "step": 40, "epoch": 4, "batch": 0}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


EXIT_WITH_A_WRITE_IN_FLIGHT = """
import sys, threading
import numpy as np, tensorflow as tf
from knl_train.models import build
from knl_train.train.checkpoint import CheckpointManager
release, real_write = threading.Event(), tf.train.Checkpoint.write
def held(self, prefix, *args, **kwargs):
    release.wait()
    return real_write(self, prefix, *args, **kwargs)
tf.train.Checkpoint.write = held
model = build("small_cnn", num_classes=3, image_size=8)
opt = tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9)
model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.train_on_batch(np.zeros((2, 8, 8, 3), "float32"), np.array([0, 1]))
mgr = CheckpointManager(sys.argv[1], model, opt)
mgr.begin(7, {"epoch": 1, "batch": 0})
print("in flight at exit:", mgr.in_flight, flush=True)
release.set()  # the script ends here, without wait()
"""


def test_an_interpreter_exiting_with_a_write_in_flight_finishes_it(tmp_path):
    script = tmp_path / "exit.py"
    script.write_text(EXIT_WITH_A_WRITE_IN_FLIGHT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpts")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "in flight at exit: True" in proc.stdout
    assert latest_state(tmp_path / "ckpts") == {"name": "step-00000007", "step": 7, "epoch": 1, "batch": 0}
    assert _steps(tmp_path / "ckpts") == ["step-00000007"]


# ---- choosing the checkpoint to resume from: scan and verify, latest.json aside ---------------
def _three(tmp_path, model_and_opt):
    mgr = CheckpointManager(tmp_path, *model_and_opt, keep=3)
    for step in (10, 20, 30):
        mgr.save(step, {"epoch": step // 10, "batch": 0})
    return mgr


def _data_file(path):
    (data,) = path.glob("ckpt.data-*")
    return data


def test_a_torn_latest_json_does_not_hide_the_checkpoints(tmp_path, model_and_opt):
    _three(tmp_path, model_and_opt)
    (tmp_path / "latest.json").write_text('{"name": "step-000')
    choice = newest_good(tmp_path)
    assert choice.state["name"] == "step-00000030" and choice.skipped == []
    (tmp_path / "latest.json").unlink()
    assert latest_state(tmp_path)["step"] == 30


def test_a_checkpoint_without_its_index_is_skipped_for_the_previous(tmp_path, model_and_opt):
    _three(tmp_path, model_and_opt)
    (tmp_path / "step-00000030" / "ckpt.index").unlink()
    choice = newest_good(tmp_path)
    assert choice.state["name"] == "step-00000020"
    assert choice.skipped == [("step-00000030", "its index file ckpt.index is missing")]


def test_a_truncated_data_file_is_skipped_for_the_previous(tmp_path, model_and_opt):
    mgr = _three(tmp_path, model_and_opt)
    data = _data_file(tmp_path / "step-00000030")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(IndexError, match="Read less bytes than requested"):  # a restore of it
        mgr.restore(tmp_path / "step-00000030")
    choice = newest_good(tmp_path)
    assert choice.state["name"] == "step-00000020"
    ((name, why),) = choice.skipped
    assert name == "step-00000030" and why.startswith("its TensorFlow data cannot be read (")
    mgr.restore(tmp_path / choice.state["name"])  # the chosen one restores


def test_flipped_bytes_in_the_data_or_a_garbage_index_are_caught(tmp_path, model_and_opt):
    _three(tmp_path, model_and_opt)
    data = _data_file(tmp_path / "step-00000030")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    (tmp_path / "step-00000020" / "ckpt.index").write_bytes(b"not an index at all")
    choice = newest_good(tmp_path)
    assert choice.state["name"] == "step-00000010"
    assert [n for n, _ in choice.skipped] == ["step-00000030", "step-00000020"]
    assert all(why.startswith("its TensorFlow data cannot be read") for _, why in choice.skipped)


@pytest.mark.parametrize("content, why", [
    ('{"name": "step-00000030", "st', "state.json is not complete JSON"),
    ('{"name": "step-00000020", "step": 20}', "state.json does not describe step-00000030"),
    (None, "no readable state.json"),
])
def test_a_bad_state_file_is_skipped(tmp_path, model_and_opt, content, why):
    _three(tmp_path, model_and_opt)
    state = tmp_path / "step-00000030" / "state.json"
    if content is None:
        state.unlink()
    else:
        state.write_text(content)
    choice = newest_good(tmp_path)
    assert choice.state["name"] == "step-00000020"
    assert choice.skipped[0][0] == "step-00000030" and choice.skipped[0][1].startswith(why)


def test_no_good_checkpoint_names_each_and_temporaries_are_not_checkpoints(tmp_path, model_and_opt):
    _three(tmp_path, model_and_opt)
    for step in (10, 20, 30):
        (tmp_path / f"step-{step:08d}" / "ckpt.index").unlink()
    (tmp_path / ".step-00000040.tmp").mkdir()
    choice = newest_good(tmp_path)
    assert choice.state is None
    assert [n for n, _ in choice.skipped] == ["step-00000030", "step-00000020", "step-00000010"]
    assert newest_good(tmp_path / "nothing-here") == Choice(None, [])
