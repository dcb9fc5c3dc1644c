"""Data-parallel equivalence: N ranks on slices of a global batch vs one process on all of it.

Usage: hvd_equivalence.py OUT_DIR
Runs every configuration below and writes OUT_DIR/<config>.rank<r>.npz (weights, iterations).
Under mpirun each rank takes its 1/N slice of each global batch; with backward_passes_per_step
k it splits that slice into k micro-batches. The model has no BatchNormalization, so the mean
loss over the global batch is exactly the average of the per-slice means.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from knl_train.dist import horovod as dist  # noqa: E402
from knl_train.optim import LARS, WarmupPolyDecay  # noqa: E402
from knl_train.optim.schedules import per_update  # noqa: E402

GLOBAL_BATCH, STEPS = 16, 5
CONFIGS = {  # name: (variant, backward_passes_per_step, compression)
    "you": ("you", 1, "none"),
    "tf_contrib": ("tf_contrib", 1, "none"),
    "model_garden": ("model_garden", 1, "none"),
    "you_bpps2": ("you", 2, "none"),
    "you_fp16": ("you", 1, "fp16"),
}

out = sys.argv[1]
world = dist.init()
tf.config.threading.set_intra_op_parallelism_threads(1)


def model_fn():
    tf.keras.utils.set_random_seed(11)
    return tf.keras.Sequential([
        tf.keras.Input((8, 8, 3)),
        tf.keras.layers.Conv2D(4, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(3),
    ])


def global_batch(step):
    rng = np.random.default_rng(100 + step)
    return (rng.normal(size=(GLOBAL_BATCH, 8, 8, 3)).astype(np.float32),
            rng.integers(0, 3, size=GLOBAL_BATCH).astype(np.int32))


for name, (variant, bpps, compression) in CONFIGS.items():
    model = model_fn()
    passes = bpps if world.size > 1 else 1
    # Horovod advances `iterations` per micro-batch: the schedule counts updates (as the trainer's).
    schedule = per_update(WarmupPolyDecay(peak_lr=2.0, total_steps=STEPS, warmup_steps=2,
                                          warmup_start_lr=0.5), passes)
    lars = LARS(schedule, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, variant=variant)
    opt = dist.distributed_optimizer(lars, backward_passes_per_step=passes, compression=compression)
    model.compile(optimizer=opt,
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dist.broadcast_from_root(model.variables)
    share = GLOBAL_BATCH // world.size
    for step in range(STEPS):
        x, y = global_batch(step)
        x, y = x[world.rank * share:(world.rank + 1) * share], y[world.rank * share:(world.rank + 1) * share]
        # A single process is the reference: one backward pass over the whole batch.
        for xm, ym in zip(np.split(x, passes), np.split(y, passes)):
            model.train_on_batch(xm, ym)
    np.savez(os.path.join(out, f"{name}.rank{world.rank}.npz"),
             iterations=int(opt.iterations.numpy()), size=world.size,
             **{f"w{i}": v.numpy() for i, v in enumerate(model.variables)})
