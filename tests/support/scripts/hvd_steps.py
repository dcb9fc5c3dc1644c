"""Run under N ranks: a few LARS steps on rank-specific data, then dump weights and losses.

Usage: hvd_steps.py OUT_DIR [steps]
Each rank writes OUT_DIR/rank<r>.npz with its final weights and its loss on a fixed batch
before and after training (the same batch on every rank).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from knl_train.dist import horovod as dist  # noqa: E402
from knl_train.models import build  # noqa: E402
from knl_train.optim import LARS, WarmupPolyDecay  # noqa: E402

out, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
world = dist.init()
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.keras.utils.set_random_seed(7 + world.rank)  # different init per rank: broadcast must fix it

model = build("small_cnn", num_classes=4, image_size=16)
schedule = WarmupPolyDecay(peak_lr=4.0, total_steps=steps, warmup_steps=1)
opt = dist.distributed_optimizer(LARS(schedule, weight_decay=5e-4))
loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(optimizer=opt, loss=loss_fn)
dist.broadcast_from_root(model.variables)

# A learnable task: the label is the quadrant of the brightest pixel. Data differ per rank.
def batch(seed, n=32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=n)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8, :] += 2.0
    return x, y.astype(np.int32)

xe, ye = batch(999)
before = float(model.evaluate(xe, ye, verbose=0))
for step in range(steps):
    x, y = batch(1000 * step + world.rank)
    model.train_on_batch(x, y)
trainable = {f"t{i}": v.numpy() for i, v in enumerate(model.trainable_variables)}
dist.average_non_trainable(model)  # BN moving statistics are per rank until averaged
after = float(model.evaluate(xe, ye, verbose=0))
weights = {f"w{i}": v.numpy() for i, v in enumerate(model.variables)}
np.savez(os.path.join(out, f"rank{world.rank}.npz"), before=before, after=after,
         size=world.size, controller=world.controller, **trainable, **weights)
