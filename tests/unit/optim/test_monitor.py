"""Per-layer trust ratios: readable after each step, logged by a Keras callback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from knl_train.optim import LARS
from knl_train.optim.monitor import TrustRatioMonitor


def _model():
    tf.keras.utils.set_random_seed(5)
    return tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(4, name="hidden"),
                                tf.keras.layers.BatchNormalization(name="bn"),
                                tf.keras.layers.Dense(3, name="out")])


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def test_trust_ratios_equal_the_formula_for_the_last_step():
    model = _model()
    opt = LARS(0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    before = {v.name: v.numpy().astype(np.float64) for v in model.trainable_variables}
    opt.apply_gradients(zip(grads, model.trainable_variables))
    ratios = opt.trust_ratios()
    # Only the two kernels are adapted by default (rank <= 1 excluded).
    assert sorted(ratios) == ["hidden/kernel:0", "out/kernel:0"]
    for v, g in zip(model.trainable_variables, grads):
        if v.name in ratios:
            w = before[v.name]
            expected = 0.02 * np.linalg.norm(w) / (np.linalg.norm(g.numpy()) + 1e-3 * np.linalg.norm(w))
            assert ratios[v.name] == pytest.approx(expected, rel=1e-5)
    everything = opt.trust_ratios(include_excluded=True)
    assert len(everything) == 6 and everything["bn/gamma:0"] == 1.0


def test_monitor_writes_stats_every_n_batches(tmp_path):
    model = _model()
    model.compile(optimizer=LARS(0.5, weight_decay=1e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    jsonl = tmp_path / "tr.jsonl"
    mon = TrustRatioMonitor(every=2, log_dir=tmp_path / "tb", jsonl_path=jsonl)
    x, y = _data(64)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[mon])  # 8 batches
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["batch"] for r in records] == [2, 4, 6, 8]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    last = model.optimizer.trust_ratios()
    r = records[-1]
    assert r["count"] == 2
    assert r["min"] == pytest.approx(min(last.values())) and r["max"] == pytest.approx(max(last.values()))
    assert r["min"] <= r["median"] <= r["max"] and r["argmax"] in last
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert mon.history == records


def test_monitor_rejects_a_bad_period():
    with pytest.raises(ValueError, match="every"):
        TrustRatioMonitor(every=0)
