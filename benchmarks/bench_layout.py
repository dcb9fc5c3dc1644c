"""Channels-last vs channels-first: one ResNet-50 forward+backward step on this CPU.

    .venv/bin/python benchmarks/bench_layout.py [--size 112] [--batch 8] [--steps 5]

Builds ``tf.keras.applications.ResNet50(weights=None)`` in each data format, times a
``tf.function`` step (forward, loss, gradients; no optimizer) on random data after two warm-up
steps, and reports the median step time. An error in a layout (TF's CPU kernels lack NCHW for
some ops) is the result for that layout and is recorded. Writes benchmarks/results/layout.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "layout.json"


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def measure(fmt, size, batch, steps):
    tf.keras.backend.clear_session()
    tf.keras.backend.set_image_data_format(fmt)
    try:
        shape = (size, size, 3) if fmt == "channels_last" else (3, size, size)
        model = tf.keras.applications.ResNet50(weights=None, input_shape=shape, classes=1000,
                                               classifier_activation=None)
        x = tf.random.uniform((batch, *shape))
        y = tf.random.uniform((batch,), maxval=1000, dtype=tf.int32)
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return loss, tape.gradient(loss, model.trainable_variables)

        for _ in range(2):
            tf.nest.map_structure(lambda t: t.numpy(), step())
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), step())
            times.append(time.perf_counter() - t0)
        return {"ok": True, "median_s": statistics.median(times), "times_s": times}
    except Exception as e:  # noqa: BLE001  (the failure is the measurement)
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
    finally:
        tf.keras.backend.set_image_data_format("channels_last")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    results = {fmt: measure(fmt, args.size, args.batch, args.steps)
               for fmt in ("channels_last", "channels_first")}
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "tensorflow": tf.__version__,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "load_avg": os.getloadavg(), "model": "ResNet50", "image_size": args.size,
        "batch": args.batch, "steps": args.steps, "step": "forward+backward", "results": results,
    }
    print(f"ResNet-50 fwd+bwd, {args.size}px, batch {args.batch}, {record['cpu']}, "
          f"{record['cores']} cores, TF {tf.__version__}")
    print(f"{'layout':<16}{'median step (s)':>16}{'img/s':>10}  note")
    for fmt, r in results.items():
        if r["ok"]:
            print(f"{fmt:<16}{r['median_s']:>16.3f}{args.batch / r['median_s']:>10.1f}")
        else:
            print(f"{fmt:<16}{'failed':>16}{'-':>10}  {r['error']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
