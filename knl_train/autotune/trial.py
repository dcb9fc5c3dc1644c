"""One autotuner trial on every rank: a short synthetic training run, timed after its warm-up.

    python -m knl_train.autotune.trial --model resnet50 --image-size 128 --batch 16 \\
        --warmup 3 --steps 10 --precision fp32 --out trial.json

Run under ``knl-train launch`` (which applies the candidate's preset: threads, oneDNN, ITEX,
OpenMP and Horovod settings) or alone as one rank. The step is the trainer's own, built by
``knl_train.train.setup`` from the default training config: the model from the registry (with
float32 logits under mixed_bf16), LARS on its schedule under Horovod's DistributedOptimizer, the
same loss and metrics, Keras ``fit``. The images are ``data.synthetic``'s cached batch, so
nothing is decoded. TF's thread pools are set only when ``TF_NUM_INTRAOP_THREADS`` /
``TF_NUM_INTEROP_THREADS`` say so: without them the run keeps TF's defaults, which is the
autotuner's baseline.

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

from knl_train import log as knl_log
from knl_train.atomic import write_json_atomic
from knl_train.errors import UserError
from knl_train.runtime import itex
from knl_train.runtime.rankenv import RankEnv
from knl_train.train.config import DataConfig, TrainConfig

PRECISIONS = ("fp32", "mixed_bf16")
# What a trial reports of its environment (the knobs the autotuner turns, and their effects).
REPORTED_ENV = tuple(RankEnv.var(field) for field in (
    "intra_op", "inter_op", "onednn", "omp_threads", "kmp_blocktime", "kmp_affinity", "omp_places",
    "omp_proc_bind", "itex", "data_threads", "fusion_threshold_bytes", "cycle_time_ms",
    "horovod_thread_affinity"))

# By its module name: run as ``python -m``, ``__name__`` is "__main__".
log = knl_log.get("knl_train.autotune.trial")


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


def trial_config(args) -> TrainConfig:
    """The trainer's default config, with the trial's model, batch, images and precision."""
    return TrainConfig(model=args.model, precision=args.precision, per_rank_batch=args.batch,
                       data=DataConfig(format="synthetic", image_size=args.image_size,
                                       num_classes=args.classes))


def run(args):
    """Train, time, and return (the record, whether this is rank 0)."""
    if itex.requested():
        itex.enable()  # before TF is imported below
    # The trainer's own pieces; they import TF (and ITEX's plugin if enabled).
    import tensorflow as tf
    from knl_train.data import synthetic
    from knl_train.dist import horovod as dist
    from knl_train.train import setup

    cfg = setup.with_data_threads(trial_config(args))
    setup.horovod_environment(cfg)
    world = dist.init()
    env = RankEnv.from_environ()
    intra, inter = env.intra_op or 0, env.inter_op or 0
    setup.set_tf_threads(intra, inter)  # unset: TF's defaults, the autotuner's baseline
    setup.configure_keras(cfg)
    total = args.warmup + args.steps
    schedule = setup.build_schedule(cfg, updates_per_epoch=total, total_updates=total,
                                    global_batch=args.batch * world.size,
                                    passes=cfg.horovod.backward_passes_per_step)
    model, _ = setup.build_model_and_optimizer(cfg, schedule, args.classes)
    data = synthetic.dataset(per_rank_batch=args.batch, image_size=args.image_size,
                             num_classes=args.classes, seed=cfg.seed, rank=world.rank,
                             mode="cached", threads=cfg.data.threads)
    timer = step_timer()
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
        log.error(str(e), extra=knl_log.EVERY_RANK)
        return 2
    if is_root:
        write_json_atomic(args.out, record)
        log.info(f"{record['images_per_sec']:.2f} images/s on {record['ranks']} rank(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
