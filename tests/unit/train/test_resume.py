"""Resuming a run (knl_train/train/resume.py): which checkpoint, what the metrics keep, and the errors."""

from __future__ import annotations

import pytest
import tensorflow as tf

from knl_train.errors import UserError
from knl_train.models import build
from knl_train.train.checkpoint import CheckpointManager
from knl_train.train.resume import find, trim_metrics
from tests.support import KNL_TRAIN, run_cli


def train_args(data, run, *extra):
    return [KNL_TRAIN, "train", "--set", f"data.path={data}", "--set", "data.image_size=16",
            "--set", f"run_dir={run}", "--set", "per_rank_batch=8", "--set", "log_every=10",
            "--set", "guard.every=10", *extra]


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    proc = run_cli(*train_args(tiny_dataset, tmp_path / "run")[1:], "--resume")
    assert proc.returncode == 2
    assert f"--resume: there is no checkpoint in {tmp_path / 'run' / 'checkpoints'}" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- find and trim_metrics, in process ---------------------------------------------------------
@pytest.fixture()
def checkpoints(tmp_path):
    """A run's checkpoints of steps 10, 20, 30 (global batch 16), as a trainer leaves them."""
    tf.keras.utils.set_random_seed(0)
    model = build("small_cnn", num_classes=3, image_size=8)
    mgr = CheckpointManager(tmp_path / "checkpoints", model, tf.keras.optimizers.SGD(0.1), keep=3)
    for step in (10, 20, 30):
        mgr.save(step, {"epoch": step // 10, "batch": 0, "global_batch": 16, "passes": 1,
                        "config": {"epochs": 3}})
    return tmp_path / "checkpoints"


def _find(directory, mode="auto"):
    return find(directory, mode, global_batch=16, passes=1, config={"epochs": 3})


def _tree(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_find_resumes_from_the_newest_good_checkpoint_and_warns_of_each_skipped(checkpoints, capsys):
    (checkpoints / "latest.json").write_text('{"name": "step-0000')  # torn: not consulted
    (checkpoints / "step-00000030" / "ckpt.index").unlink()
    (data,) = (checkpoints / "step-00000020").glob("ckpt.data-*")
    data.write_bytes(data.read_bytes()[:100])
    state = _find(checkpoints)
    assert (state["name"], state["step"], state["epoch"]) == ("step-00000010", 10, 1)
    warnings = [l for l in capsys.readouterr().err.splitlines() if "warning:" in l]
    assert warnings == [
        f"knl-train: warning: skipped checkpoint {checkpoints / 'step-00000030'}: "
        "its index file ckpt.index is missing",
        f"knl-train: warning: skipped checkpoint {checkpoints / 'step-00000020'}: "
        "its TensorFlow data cannot be read (Read less bytes than requested)"]
    assert _find(checkpoints, "fresh") is None


@pytest.mark.parametrize("mode", ["auto", "resume"])
def test_find_with_no_good_checkpoint_is_one_line_and_deletes_nothing(checkpoints, mode):
    for step in (10, 20):
        (checkpoints / f"step-{step:08d}" / "ckpt.index").unlink()
    (checkpoints / "step-00000030" / "state.json").write_text('{"name": "step')
    before = _tree(checkpoints)
    with pytest.raises(UserError) as e:
        _find(checkpoints, mode)
    assert str(e.value) == (
        f"no usable checkpoint in {checkpoints}: step-00000030: state.json is not complete JSON; "
        "step-00000020: its index file ckpt.index is missing; step-00000010: its index file "
        "ckpt.index is missing. Nothing was changed. Rerun with --fresh to start over (keeping "
        "nothing), or restore a good checkpoint there to resume from it.")
    assert "\n" not in str(e.value) and _tree(checkpoints) == before


def test_trim_metrics_drops_a_torn_last_line_with_a_note(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 10}\n{"kind": "step", "step": 20}\n{"kind": "ep')
    trim_metrics(path, 20)
    assert path.read_text() == '{"kind": "step", "step": 10}\n{"kind": "step", "step": 20}\n'
    assert f"knl-train: warning: dropped the cut-off last line 3 of {path}" in capsys.readouterr().err
    trim_metrics(path, 10)
    assert path.read_text() == '{"kind": "step", "step": 10}\n'


def test_trim_metrics_refuses_a_bad_line_in_the_middle_and_keeps_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"kind": "step", "step": 10}\n{"kind": "st\n{"kind": "step", "step": 20}\n'
    path.write_text(text)
    with pytest.raises(UserError, match=f"^{path} line 2 is not JSON; fix or remove that line"):
        trim_metrics(path, 20)
    # A whole last line (it has its newline) that is not JSON is not a cut-off write either.
    path.write_text('{"kind": "step", "step": 10}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        trim_metrics(path, 20)
    assert path.read_text() == '{"kind": "step", "step": 10}\nnot json\n'


# ---- another model in the run directory --------------------------------------------------------
@pytest.fixture()
def small_cnn_checkpoint(tmp_path):
    """One checkpoint (step 30) of small_cnn with 4 classes, whose state holds its config."""
    tf.keras.utils.set_random_seed(0)
    model = build("small_cnn", num_classes=4, image_size=8)
    opt = tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9)
    opt._create_all_weights(model.trainable_variables)  # the slots, as the trainer creates them
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints", model, opt)
    mgr.save(30, {"epoch": 1, "batch": 0, "global_batch": 16, "passes": 1,
                  "config": {"model": "small_cnn", "data": {"num_classes": 4}, "epochs": 3}})
    return tmp_path / "run" / "checkpoints"


@pytest.mark.parametrize("model, classes, old, new", [
    ("resnet20", 4, "small_cnn (4 classes)", "resnet20 (4 classes)"),
    ("small_cnn", 10, "small_cnn (4 classes)", "small_cnn (10 classes)"),
    ("resnet20", None, "small_cnn (4 classes)", "resnet20")])
def test_a_checkpoint_of_another_model_is_one_line_before_any_restore(small_cnn_checkpoint, model,
                                                                      classes, old, new):
    with pytest.raises(UserError) as e:
        find(small_cnn_checkpoint, "auto", global_batch=16, passes=1,
             config={"model": model, "data": {"num_classes": classes}, "epochs": 3})
    assert str(e.value) == (
        f"run_dir {small_cnn_checkpoint.parent} holds checkpoints of model {old} (newest "
        f"step-00000030, step 30); this config trains model {new}: use another run_dir, or "
        "--fresh to discard them")
    assert find(small_cnn_checkpoint, "fresh", global_batch=16, passes=1, config={}) is None


def test_the_same_model_resumes_and_notes_what_else_differs(small_cnn_checkpoint):
    # num_classes left to the data (None) on one side cannot be compared: the restore checks it.
    state = find(small_cnn_checkpoint, "auto", global_batch=16, passes=1,
                 config={"model": "small_cnn", "data": {"num_classes": None}, "epochs": 5})
    assert state["step"] == 30 and "config" not in state
    assert state["notes"] == ["note: the config differs from the checkpoint's in data.num_classes, epochs"]


@pytest.mark.parametrize("model, classes, shapes", [
    ("small_cnn", 10, "shape (4,) when attempting to restore variable with shape (10,)"),
    ("resnet20", 4, "shape (3, 3, 3, 32) when attempting to restore variable with shape (3, 3, 3, 16)")])
def test_a_restore_into_variables_of_other_shapes_is_one_line(small_cnn_checkpoint, model, classes,
                                                               shapes):
    tf.keras.utils.set_random_seed(0)
    other = build(model, num_classes=classes, image_size=8)
    opt = tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9)
    opt._create_all_weights(other.trainable_variables)
    path = small_cnn_checkpoint / "step-00000030"
    with pytest.raises(UserError) as e:
        CheckpointManager(small_cnn_checkpoint, other, opt).restore(path)
    message = str(e.value)
    assert message.startswith(f"checkpoint {path} does not fit this run's model and optimizer "
                              "(Received incompatible tensor with ")
    assert shapes in message and "\n" not in message
    assert message.endswith("it was written for another model, number of classes or optimizer: "
                            "use another run_dir, or --fresh to discard its checkpoints")
