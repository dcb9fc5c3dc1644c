"""One autotuner trial on every rank: a short synthetic training run, timed after its warm-up.

    python -m knl_train.autotune.trial --model resnet50 --image-size 128 --batch 16 \\
        --warmup 3 --steps 10 --precision fp32 --out trial.json

Run under ``knl-train launch`` (which applies the candidate's preset: threads, oneDNN, ITEX,
OpenMP and Horovod settings) or alone as one rank. The images sit in memory as one random
batch, so nothing is decoded; the step is the trainer's: the model from the registry, LARS
under Horovod's DistributedOptimizer, Keras ``fit``. TF's thread pools are set only when
``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` say so (as for the trainer): without
them the run keeps TF's defaults, which is the autotuner's baseline.

Rank 0 writes JSON: global images/s over the timed steps (all ranks' images over the slowest
rank's time), rank 0's per-step seconds, every rank's elapsed time, and the thread counts, ITEX
and oneDNN state the process actually had.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

from knl_train.errors import UserError
from knl_train.runtime.rankenv import count_var

PRECISIONS = ("fp32", "mixed_bf16")
THREAD_VARS = {"intra_op": "TF_NUM_INTRAOP_THREADS", "inter_op": "TF_NUM_INTEROP_THREADS"}
# What a trial reports of its environment (the knobs the autotuner turns, and their effects).
REPORTED_ENV = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS",
                "OMP_NUM_THREADS", "KMP_BLOCKTIME", "KMP_AFFINITY", "OMP_PLACES", "OMP_PROC_BIND",
                "KNL_TRAIN_ITEX", "KNL_TRAIN_DATA_THREADS", "HOROVOD_FUSION_THRESHOLD",
                "HOROVOD_CYCLE_TIME", "HOROVOD_THREAD_AFFINITY")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m knl_train.autotune.trial",
                                description="one timed synthetic training run (per rank)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16, help="images per rank per step")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, caches)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    args = p.parse_args(argv)
    for name in ("image_size", "batch", "classes", "warmup", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def run(args):
    """Train, time, and return (the record, whether this is rank 0)."""
    from knl_train.runtime import itex
    if itex.requested():
        itex.enable()  # before TF is imported below
    intra, inter = (count_var(k) for k in ("intra_op", "inter_op"))

    from knl_train.dist import horovod as dist  # imports TF (and ITEX's plugin if enabled)
    import numpy as np
    import tensorflow as tf
    # Both before the first op creates TF's thread pools; unset = TF's defaults.
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    world = dist.init()

    from knl_train import models
    from knl_train.runtime import versions
    from knl_train.optim import LARS
    versions.check_keras()
    if args.precision == "mixed_bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")

    rng = np.random.default_rng(world.rank)
    images = rng.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32)
    labels = rng.integers(0, args.classes, args.batch).astype(np.int32)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    data_threads = int(os.environ.get("KNL_TRAIN_DATA_THREADS", "0") or 0)
    if data_threads > 0:
        options = tf.data.Options()
        options.threading.private_threadpool_size = data_threads
        data = data.with_options(options)

    model = models.build(args.model, num_classes=args.classes, image_size=args.image_size)
    model.compile(optimizer=dist.distributed_optimizer(LARS(learning_rate=0.1)),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = step_timer()
    total = args.warmup + args.steps
    model.fit(data, epochs=1, steps_per_epoch=total, callbacks=[timer], verbose=0)
    if len(timer.ends) != total:
        raise RuntimeError(f"expected {total} step ends, saw {len(timer.ends)}")

    # The timed window: from the end of the last warm-up step to the end of the last step.
    ends = timer.ends[args.warmup - 1:]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    elapsed = ends[-1] - ends[0]
    # Every rank's elapsed time in its own slot: the sum hands all of them to every rank.
    slots = [0.0] * world.size
    slots[world.rank] = elapsed
    per_rank = dist.allreduce_sum(slots, name="knl_train.trial.elapsed").tolist()
    slowest = max(per_rank)
    images_total = args.steps * args.batch * world.size
    record = {
        "model": args.model, "image_size": args.image_size, "batch_per_rank": args.batch,
        "classes": args.classes, "precision": args.precision, "ranks": world.size,
        "local_ranks": world.local_size, "warmup": args.warmup, "steps": args.steps,
        "images_per_sec": images_total / slowest,
        "elapsed_seconds": slowest, "rank_elapsed_seconds": per_rank,
        "step_seconds": steps, "median_step_seconds": statistics.median(steps),
        "rank0_images_per_sec": args.steps * args.batch / elapsed,
        "threads": {
            "intra_op_requested": intra, "inter_op_requested": inter,
            # 0 = TF chose (its default: one per CPU the process may run on).
            "intra_op_tf": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_tf": tf.config.threading.get_inter_op_parallelism_threads(),
            "cpus_allowed": sorted(os.sched_getaffinity(0)),
        },
        "itex": itex.active(), "onednn": _onednn_enabled(),
        "mixed_policy": tf.keras.mixed_precision.global_policy().name,
        "env": {k: os.environ[k] for k in REPORTED_ENV if k in os.environ},
        "host": socket.gethostname(), "tensorflow": tf.__version__,
    }
    return record, world.is_root


def _onednn_enabled():
    """Whether TF's oneDNN kernels are on in this process (None if TF does not say)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def step_timer():
    """A Keras callback noting when each step ended (defined here so the module loads without TF)."""
    import tensorflow as tf

    class Timer(tf.keras.callbacks.Callback):
        """When each training step ended. Keras syncs the step's outputs to call this."""

        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    return Timer()


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args = parse_args(argv)
        record, is_root = run(args)
    except UserError as e:
        print(f"trial: {e}", file=sys.stderr)
        return 2
    if is_root:
        from knl_train.atomic import write_json_atomic
        write_json_atomic(args.out, record)
        print(f"trial: {record['images_per_sec']:.2f} images/s on {record['ranks']} rank(s)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
