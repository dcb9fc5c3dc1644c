"""Keras's own model files with knl-train's optimizers (knl_train/optim/keras_save.py): LARS,
LAMB and SGD with every knl-train schedule, beside stock Keras SGD, through ``model.save`` and
``tf.keras.models.load_model`` in .h5, SavedModel and .keras.

Each case trains a small conv + BN + dense model (so the rank <= 1 exclusions matter) for one
epoch of 4 steps, saves and loads it, then trains both copies one more epoch and compares."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from knl_train.optim import LAMB, LARS, SGD, RANK_LE_1, kernels, keras_save
from knl_train.optim.schedules import (PerUpdateSchedule, WarmupCosineDecay,
                                       WarmupMomentumCorrection, WarmupPolyDecay, WarmupStepDecay)
from tests.support import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5:UserWarning")

BATCH, SAMPLES = 8, 32  # 4 steps an epoch


def _poly():
    return WarmupPolyDecay(peak_lr=0.2, total_steps=12, warmup_steps=3, warmup_start_lr=0.02)


def _lars():
    lr = _poly()
    return LARS(lr, momentum=WarmupMomentumCorrection(lr, momentum=0.9), weight_decay=1e-3,
                trust_coefficient=0.02, exclude_from_weight_decay=[RANK_LE_1, "dense"])


def _lamb():
    return LAMB(WarmupCosineDecay(peak_lr=0.01, total_steps=12, warmup_steps=2), weight_decay=0.01,
                exclude_from_layer_adaptation=[RANK_LE_1, "conv2d/kernel"])


def _sgd():
    lr = PerUpdateSchedule(WarmupStepDecay(peak_lr=0.1, steps_per_epoch=4, boundary_epochs=[1.5],
                                           warmup_epochs=0.5, warmup_start_lr=0.01), passes=2)
    return SGD(lr, momentum=WarmupMomentumCorrection(lr, momentum=0.9, warmup_steps=2),
               nesterov=True, weight_decay=1e-3)


OPTIMIZERS = {
    "lars": _lars,  # on the fused kernel when it is built (auto), else the pure-TF path
    "lars_tf": _lars,  # the pure-TF path, forced
    "lamb": _lamb,
    "sgd": _sgd,
    # Stock Keras SGD with a knl-train schedule: Keras's own from_config meets our schedule.
    "keras_sgd": lambda: tf.keras.optimizers.legacy.SGD(_poly(), momentum=0.9),
}
FORMATS = {"h5": "model.h5", "savedmodel": "model", "keras": "model.keras"}


def _data():
    rng = np.random.default_rng(7)
    return (rng.normal(size=(SAMPLES, 8, 8, 3)).astype("float32"),
            rng.integers(0, 4, SAMPLES).astype("int32"))


def _model(optimizer):
    tf.keras.utils.set_random_seed(3)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 3)),
        # No bias before BN: its gradient is rounding noise, which LAMB's Adam step amplifies.
        tf.keras.layers.Conv2D(4, 3, use_bias=False, name="conv2d"),
        tf.keras.layers.BatchNormalization(name="bn"),
        tf.keras.layers.ReLU(),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(4, name="dense"),
    ])
    # Eagerly: tracing a training function for a handful of steps costs more than the steps.
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)
    return model


def _epoch(model):
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def _state(optimizer, skip=()):
    """{name: value} of the optimizer's variables (iterations, hypers, slots), their names
    without the optimizer's name scope: slots made in a step have it, those made on loading not."""
    return {v.name.removeprefix(f"{optimizer._name}/"): v.numpy() for v in optimizer.variables()
            if not any(s in v.name for s in skip)}


def _assert_same_weights(a, b, atol=1e-6):
    assert len(a.get_weights()) == len(b.get_weights())
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=0, atol=atol)


# Every optimizer in every format; the pure-TF LARS path in .h5 only (it saves as the fused one).
CASES = [(name, fmt) for name in OPTIMIZERS for fmt in FORMATS if name != "lars_tf" or fmt == "h5"]


@pytest.mark.parametrize("optimizer_name, fmt", CASES)
def test_save_and_load_continue_training(optimizer_name, fmt, tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "tf" if optimizer_name == "lars_tf" else "auto")
    model = _model(OPTIMIZERS[optimizer_name]())
    _epoch(model)
    path = str(tmp_path / FORMATS[fmt])
    model.save(path)

    # Plain Keras, no custom_objects: the class, its config (schedules, momentum schedules,
    # exclusions) and the weights come back in every format.
    plain = tf.keras.models.load_model(path)
    assert type(plain.optimizer) is type(model.optimizer)
    assert plain.optimizer.get_config() == model.optimizer.get_config()
    _assert_same_weights(plain, model, atol=0)
    iterations = int(model.optimizer.iterations.numpy())
    assert iterations == SAMPLES // BATCH

    if fmt == "keras":
        # Keras 2.15 keeps no state of a legacy optimizer in .keras: training goes on as with a
        # new optimizer of the same config (the config is what round-tripped).
        assert int(plain.optimizer.iterations.numpy()) == 0
        reference = _model(type(model.optimizer).from_config(model.optimizer.get_config()))
        reference.set_weights(model.get_weights())
        _epoch(plain)
        _epoch(reference)
        _assert_same_weights(plain, reference)
        return
    if fmt == "savedmodel":
        # Keras drops the state (stock SGD too, with its warning); keras_save.load_model reads it.
        assert int(plain.optimizer.iterations.numpy()) == 0
        loaded = keras_save.load_model(path)
        # The trust ratios (a record of the last step) are not in a SavedModel.
        skip = ("trust_ratio",)
    else:
        loaded = plain
        skip = ()
    assert int(loaded.optimizer.iterations.numpy()) == iterations
    before, after = _state(model.optimizer, skip), _state(loaded.optimizer, skip)
    assert sorted(before) == sorted(after) and len(before) > 3
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)

    _epoch(model)
    _epoch(loaded)
    _assert_same_weights(loaded, model)
    assert int(loaded.optimizer.iterations.numpy()) == 2 * iterations


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_trust_ratios_stay_in_checkpoints_and_h5(name, tmp_path):
    """Only a SavedModel leaves the trust ratios out; the trainer's checkpoints keep them."""
    model = _model(OPTIMIZERS[name]())
    _epoch(model)
    ratios = model.optimizer.trust_ratios()
    assert "trust_ratio" in model.optimizer.get_slot_names()
    assert ratios and all(r > 0 for r in ratios.values())
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
    names = {key for key, _ in tf.train.list_variables(str(tmp_path / "ckpt"))}
    assert sum("trust_ratio" in key for key in names) == 5  # one per trained variable
    model.save(str(tmp_path / "m.h5"))
    assert tf.keras.models.load_model(str(tmp_path / "m.h5")).optimizer.trust_ratios() == ratios


@pytest.mark.parametrize("name", ["lars", "sgd"])  # SGD: the bare name is Keras's own SGD
def test_a_horovod_wrapped_optimizer_loads_as_the_plain_one(hvd, name, tmp_path):
    """As the trainer compiles: wrapped by hvd.DistributedOptimizer (a subclass of the same name,
    made on the fly), which Keras would save under the bare name "LARS" and not find again."""
    wrapped = hvd.DistributedOptimizer(OPTIMIZERS[name]())
    model = _model(wrapped)
    _epoch(model)
    assert type(wrapped) is not type(OPTIMIZERS[name]())
    assert tf.keras.utils.get_registered_name(type(wrapped)) == f"knl_train>{name.upper()}"
    model.save(str(tmp_path / "m.h5"))
    loaded = tf.keras.models.load_model(str(tmp_path / "m.h5"))
    assert type(loaded.optimizer) is type(OPTIMIZERS[name]())
    assert int(loaded.optimizer.iterations.numpy()) == SAMPLES // BATCH
    _epoch(model)
    _epoch(loaded)
    _assert_same_weights(loaded, model)  # one rank: the allreduce is the identity


def _schedules():
    poly = _poly()
    return [poly, WarmupStepDecay(peak_lr=1.0, steps_per_epoch=4, boundary_epochs=[2]),
            WarmupCosineDecay(peak_lr=1.0, total_steps=10, warmup_steps=2),
            WarmupMomentumCorrection(poly, momentum=0.9), PerUpdateSchedule(poly, passes=2)]


@pytest.mark.parametrize("schedule", _schedules(), ids=lambda s: type(s).__name__)
def test_every_schedule_reads_back_through_the_legacy_reader(schedule):
    """What .h5 and SavedModel loading do: the new format read by the legacy reader."""
    blob = tf.keras.optimizers.schedules.serialize(schedule)
    again = tf.keras.optimizers.schedules.deserialize(blob, use_legacy_format=True)
    assert type(again) is type(schedule) and again.get_config() == schedule.get_config()
    steps = tf.constant([0, 1, 3, 5, 9])
    np.testing.assert_array_equal(again(steps).numpy(), schedule(steps).numpy())


def test_register_keras_objects_names_every_optimizer_and_schedule():
    assert keras_save.register_keras_objects() == (
        "knl_train>LAMB", "knl_train>LARS", "knl_train>PerUpdateSchedule", "knl_train>SGD",
        "knl_train>WarmupCosineDecay", "knl_train>WarmupMomentumCorrection",
        "knl_train>WarmupPolyDecay", "knl_train>WarmupStepDecay")
    assert tf.keras.utils.get_custom_objects()["WarmupPolyDecay"] is WarmupPolyDecay


def test_a_new_process_loads_without_custom_objects(tmp_path):
    """The registration a fresh process gets from ``import knl_train.optim`` and one export."""
    model = _model(_lars())
    _epoch(model)
    model.save(str(tmp_path / "m.h5"))
    script = (
        "import json, sys, tensorflow as tf\n"
        "import knl_train.optim as optim\n"
        "names = optim.register_keras_objects()\n"
        "m = tf.keras.models.load_model(sys.argv[1])\n"
        "cfg = m.optimizer.get_config()\n"
        "print(json.dumps([len(names), type(m.optimizer).__name__,\n"
        "                  int(m.optimizer.iterations.numpy()),\n"
        "                  cfg['learning_rate']['class_name'], cfg['momentum']['class_name']]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.h5")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        8, "LARS", 4, "WarmupPolyDecay", "WarmupMomentumCorrection"]
