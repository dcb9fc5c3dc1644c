"""The peer for bench_time_to_train.py: the program a Horovod user writes from Horovod's Keras
example, doing the demo's job (our own code; it imports nothing from knl_train).

    mpirun -np 2 --bind-to core ... python benchmarks/peer_horovod_keras.py --out peer.json

The job is the demo's: the folder data of ``data/demo`` (``train/<wnid>/*.JPEG`` and ``val/``,
40 classes, 32 px); small_cnn, re-created below layer for layer as
``knl_train.models.small.small_cnn`` builds it, so that the program stays plain Keras; 32 images
per rank per step; 5 epochs of ``len(train) // global batch`` steps.

The way is the Horovod user's: ``image_dataset_from_directory``, and ``.shard(size, rank)`` on
what it returns (the utility lists and decodes in one; it cannot shard file names, so each rank
decodes every image and keeps its share); one ``fit`` over all epochs on a repeated stream;
momentum SGD with the learning rate scaled by the number of ranks; ``hvd.DistributedOptimizer``;
the initial variables broadcast from rank 0; the epoch's metrics averaged over ranks; an
evaluation of the sharded validation set every epoch; and a weights checkpoint from rank 0 every
epoch. No warmup callback: it would only add per-batch work to the peer's side.

Rank 0 prints and writes (``--out``) its wall seconds (process start, from psutil, to Horovod's
shutdown, just before exit); its start-up seconds by phase, in knl-train's phases (imports,
horovod, data, model, first_step), and its first step (the end of the first training step,
after process start); its step rates: the median over steps (global images / seconds between
two consecutive step ends in an epoch) and the steady rate as knl-train's summary defines it
(epochs after the first, each from its start to its last step's end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import psutil

START = psutil.Process().create_time()  # wall-clock seconds since the epoch, like time.time()


def since_start() -> float:
    return time.time() - START


def parse_args(argv=None):
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=here / "data" / "demo",
                   help="folder dataset with train/<class>/ and val/<class>/ (default data/demo)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--per-rank-batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05, help="learning rate per rank (x ranks)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--checkpoint-dir", type=Path, default=Path("peer-checkpoints"),
                   help="rank 0's weights, one file per epoch")
    p.add_argument("--out", type=Path, help="rank 0 writes its timings here (JSON)")
    return p.parse_args(argv)


def small_cnn(tf, num_classes: int, image_size: int, width: int = 32):
    """knl-train's small_cnn: four conv-BN-ReLU blocks (two of stride 2), pooling, dense logits."""
    layers = tf.keras.layers

    def block(x, filters, stride, name):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                          name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = tf.keras.Input((image_size, image_size, 3), name="image")
    x = block(inputs, width, 1, "block1")
    x = block(x, width, 2, "block2")
    x = block(x, 2 * width, 2, "block3")
    x = block(x, 2 * width, 1, "block4")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return tf.keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name="small_cnn")


def datasets(tf, hvd, args):
    """(train stream, val dataset, steps per epoch, class count), this rank's shards."""
    size = (args.image_size, args.image_size)
    train = tf.keras.utils.image_dataset_from_directory(
        args.data / "train", label_mode="int", image_size=size, batch_size=None,
        shuffle=True, seed=args.seed)  # the same seed on every rank: disjoint shards
    val = tf.keras.utils.image_dataset_from_directory(
        args.data / "val", label_mode="int", image_size=size, batch_size=None, shuffle=False,
        class_names=train.class_names)
    steps = len(train.file_paths) // (args.per_rank_batch * hvd.size())
    classes = len(train.class_names)

    def augment(x, y):
        return tf.image.random_flip_left_right(x) / 127.5 - 1.0, y

    def scale(x, y):
        return x / 127.5 - 1.0, y

    train = (train.shard(hvd.size(), hvd.rank()).repeat()
             .batch(args.per_rank_batch, drop_remainder=True)
             .map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
    val = (val.shard(hvd.size(), hvd.rank()).batch(args.per_rank_batch)
           .map(scale, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
    return train, val, steps, classes


def clock_callback(tf):
    class Clock(tf.keras.callbacks.Callback):
        """Step ends, epoch starts, evaluation and checkpoint spans (perf_counter seconds)."""

        def __init__(self):
            super().__init__()
            self.first_step = None
            self.epoch_begin, self.step_ends, self.eval, self.ckpt = [], [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_begin.append(time.perf_counter())
            self.step_ends.append([])

        def on_train_batch_end(self, batch, logs=None):
            self.step_ends[-1].append(time.perf_counter())
            if self.first_step is None:
                self.first_step = since_start()

        def on_test_begin(self, logs=None):
            self.eval.append([time.perf_counter()])

        def on_test_end(self, logs=None):
            self.eval[-1].append(time.perf_counter())

    return Clock()


def report(clock, marks, *, global_batch: int, steps: int, wall: float) -> dict:
    """Rank 0's timings: wall, start-up (seconds per phase), per-step and per-epoch rates."""
    gaps = [b - a for ends in clock.step_ends for a, b in zip(ends, ends[1:])]
    epoch_seconds = [ends[-1] - t0 for t0, ends in zip(clock.epoch_begin, clock.step_ends)]
    steady = epoch_seconds[1:] or epoch_seconds
    images = global_batch * steps
    return {
        "wall_seconds": round(wall, 3),
        "first_step_seconds": round(clock.first_step, 3),
        "startup": {k: round(t - last, 3) for (k, t), last in zip(marks.items(),
                                                                 [0.0, *marks.values()])},
        "median_step_images_per_sec": round(global_batch / statistics.median(gaps), 1),
        "images_per_sec": round(images * len(steady) / sum(steady), 1),
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "eval_seconds": [round(b - a, 3) for a, b in clock.eval],
        "checkpoint_seconds": [round(b - a, 3) for a, b in clock.ckpt],
        "images_trained": images * len(epoch_seconds),
        "global_batch": global_batch, "steps_per_epoch": steps, "epochs": len(epoch_seconds),
    }


def main(argv=None):
    args = parse_args(argv)
    marks = {}  # knl-train's start-up phases (train/clock.py), each ending at its mark
    import tensorflow as tf
    import horovod.tensorflow.keras as hvd
    marks["imports"] = since_start()
    hvd.init()
    marks["horovod"] = since_start()

    train, val, steps, classes = datasets(tf, hvd, args)
    marks["data"] = since_start()
    model = small_cnn(tf, classes, args.image_size)
    opt = hvd.DistributedOptimizer(
        tf.keras.optimizers.SGD(learning_rate=args.lr * hvd.size(), momentum=args.momentum))
    model.compile(optimizer=opt, metrics=["accuracy"],
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    marks["model"] = since_start()

    clock = clock_callback(tf)
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                 hvd.callbacks.MetricAverageCallback(), clock]
    if hvd.rank() == 0:  # one writer: the other ranks hold the same weights
        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        mark = tf.keras.callbacks.LambdaCallback
        callbacks += [mark(on_epoch_end=lambda e, logs: clock.ckpt.append([time.perf_counter()])),
                      tf.keras.callbacks.ModelCheckpoint(
                          str(args.checkpoint_dir / "weights-{epoch:02d}.h5"), save_weights_only=True),
                      mark(on_epoch_end=lambda e, logs: clock.ckpt[-1].append(time.perf_counter()))]
    model.fit(train, epochs=args.epochs, steps_per_epoch=steps, validation_data=val,
              callbacks=callbacks, verbose=2 if hvd.rank() == 0 else 0)
    rank, ranks = hvd.rank(), hvd.size()
    hvd.shutdown()  # what exit would do; the wall clock then ends where the program does
    if rank != 0:
        return
    marks["first_step"] = clock.first_step
    out = report(clock, marks, global_batch=args.per_rank_batch * ranks, steps=steps,
                 wall=since_start())
    out.update(ranks=ranks, optimizer="sgd", lr=args.lr * ranks,
               versions={"tensorflow": tf.__version__, "horovod": _horovod_version()})
    print(f"peer: {out['wall_seconds']:.1f} s wall, first step {out['first_step_seconds']:.2f} s "
          f"after process start, median step {out['median_step_images_per_sec']:.0f} img/s, "
          f"steady {out['images_per_sec']:.0f} img/s", flush=True)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, args.out)


def _horovod_version():
    import horovod
    return horovod.__version__


if __name__ == "__main__":
    main()
