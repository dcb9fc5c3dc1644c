"""Training input pipeline throughput (decode + Inception augment) per core, next to ResNet-50's
training consumption on the same cores.

    .venv/bin/python benchmarks/bench_input.py            # ~3-5 min
    .venv/bin/python benchmarks/bench_input.py --quick    # ~1-2 min

Input: generated JPEGs of ImageNet's typical size (500 x 375, quality 90, smooth noise so they
compress like photographs) held in memory, through ``augment.train_image`` (fused
decode-and-crop, resize to 224, flip, normalise) on a private pool of T threads, batched by 32.
Compute: ``tf.keras.applications.ResNet50`` (random weights) forward + backward + SGD step at
224 px, intra-op threads = all cores. Results go to ``benchmarks/results/input.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from knl_train.data import augment as aug  # noqa: E402
from knl_train.data.pipeline import with_threads  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def make_jpegs(n, w=500, h=375, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, size=(h, w, 3)), 0, 255)
        b = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(b, format="JPEG", quality=90)
        out.append(b.getvalue())
    return out


def input_rate(jpegs, threads, seconds, size=224, batch=32):
    a = aug.Augment(mode="inception")
    ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
    ds = ds.map(lambda i, d: (aug.train_image(d, tf.stack([tf.constant(0, tf.int64), i]), size, a), 0),
                num_parallel_calls=threads, deterministic=True).batch(batch).prefetch(2)
    it = iter(with_threads(ds, threads))
    for _ in range(3):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += batch
    return n / (time.perf_counter() - t0)


def resnet_rate(batch, steps, size=224):
    model = tf.keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=1000,
                                            classifier_activation=None)
    opt = tf.keras.optimizers.SGD(0.01, momentum=0.9)
    x = tf.random.normal([batch, size, size, 3])
    y = tf.random.uniform([batch], 0, 1000, dtype=tf.int32)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step().numpy()
    return batch * steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    load0 = os.getloadavg()
    jpegs = make_jpegs(64 if args.quick else 256)
    secs = 5 if args.quick else 15
    rates = {t: input_rate(jpegs, t, secs) for t in sorted({1, cores})}
    train = resnet_rate(8 if args.quick else 16, 3 if args.quick else 6)
    per_core = rates[1]
    need = train / per_core
    load1 = os.getloadavg()
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
           "cpu": platform.processor() or platform.machine(), "cores": cores, "quick": args.quick,
           "loadavg_before": load0, "loadavg_after": load1,
           "input_images_per_sec_by_threads": rates, "input_images_per_sec_per_core": per_core,
           "resnet50_train_images_per_sec_all_cores": train,
           "input_cores_needed_per_rank": need,
           "input_share_of_cores_at_this_rate": need / cores}
    name = "input.quick" if args.quick else "input"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    verdict = ("input would NOT be the bottleneck" if need < 0.5 * cores else
               "input WOULD compete with compute for cores")
    md = [f"# Input pipeline vs ResNet-50 ({res['date']}, {res['host']}, {cores} cores, "
          f"load avg {load0[0]:.1f} -> {load1[0]:.1f}{', quick' if args.quick else ''})", "",
          "| threads | input images/s (decode + Inception crop + flip, 224 px) |", "|---|---|"]
    md += [f"| {t} | {r:.1f} |" for t, r in rates.items()]
    md += ["", f"ResNet-50 training on all {cores} cores: {train:.2f} images/s.",
           f"One input core keeps up with {per_core / train:.1f}x that; a rank needs "
           f"{need:.2f} cores of input for its compute: {verdict}.", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
