"""Keras callbacks of the trainer: throughput, sharded evaluation, progress and metrics.

Every rank runs ``TrainingMonitor`` because evaluation and metric averaging are collectives that
all ranks must enter in the same order; only rank 0 prints and writes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf

from knl_train.dist import horovod as dist
from knl_train.dist import under_launcher
from knl_train.io import append_jsonl


def progress_mode() -> str:
    """'bar' for a person at a terminal, 'lines' for batch logs.

    Under mpirun every rank's stdout is a pty even in a batch job, so the launcher passes what it
    saw in KNL_TRAIN_PROGRESS; without it, a rank under MPI assumes a log file.
    """
    mode = os.environ.get("KNL_TRAIN_PROGRESS")
    if mode in ("bar", "lines"):
        return mode
    return "bar" if sys.stdout.isatty() and not under_launcher() else "lines"


def make_eval_step(model, top_k: int):
    @tf.function
    def eval_step(x, y):
        logits = model(x, training=False)
        y = tf.cast(y, tf.int32)
        loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        top1 = tf.cast(tf.math.in_top_k(y, logits, 1), tf.float64)
        topk = tf.cast(tf.math.in_top_k(y, logits, top_k), tf.float64)
        return tf.stack([tf.reduce_sum(tf.cast(loss, tf.float64)), tf.reduce_sum(top1),
                         tf.reduce_sum(topk), tf.cast(tf.shape(y)[0], tf.float64)])
    return eval_step


class TrainingMonitor(tf.keras.callbacks.Callback):
    """Per-step and per-epoch metrics, averaged over ranks; evaluation sharded over ranks."""

    def __init__(self, *, world, global_batch: int, steps_per_epoch: int, epochs: int,
                 eval_dataset_fn: Callable[[], tf.data.Dataset], num_classes: int,
                 metrics_path: Optional[str], log_every: int, lr_fn: Callable[[], float],
                 skips=None, print_fn=print):
        super().__init__()
        self.world = world
        self.global_batch = global_batch
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.eval_dataset_fn = eval_dataset_fn
        self.top_k = min(5, num_classes)
        self.metrics_path = metrics_path if world.is_root else None
        self.log_every = log_every
        self.lr_fn = lr_fn
        self.skips = skips
        self.print = print_fn
        self.history: List[dict] = []
        self.train_seconds: List[float] = []
        self._eval_step = None
        self._progbar = None
        self._tty = world.is_root and progress_mode() == "bar"

    # ---- training steps ------------------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._t0 = self._t_last = time.perf_counter()
        if self._tty:
            self._progbar = tf.keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=["lr"])

    def on_train_batch_end(self, batch, logs=None):
        step_in_epoch = batch + 1
        if self._progbar is not None:
            self._progbar.update(step_in_epoch, [("loss", logs["loss"]), ("top1", logs["top1"]),
                                                 ("lr", self.lr_fn())])
        if step_in_epoch % self.log_every and step_in_epoch != self.steps_per_epoch:
            return
        # Running epoch means, averaged over ranks (a collective: every rank is here).
        loss, top1 = dist.allreduce_mean([logs["loss"], logs["top1"]], name="monitor.step")
        now = time.perf_counter()
        n_steps = step_in_epoch % self.log_every or self.log_every
        dt = (now - self._t_last) / n_steps
        self._t_last = now
        step = self._epoch * self.steps_per_epoch + step_in_epoch
        rec = {"kind": "step", "step": step, "epoch": self._epoch + 1, "loss": float(loss),
               "top1": float(top1), "lr": self.lr_fn(), "step_seconds": dt,
               "images_per_sec": self.global_batch / dt,
               "images_per_sec_per_rank": self.global_batch / dt / self.world.size}
        if self.world.is_root:
            append_jsonl(self.metrics_path, rec)
            if not self._tty:
                self.print(f"  step {step:6d}  epoch {self._epoch + 1}/{self.epochs}  loss {loss:.4f}  "
                           f"top1 {top1:.3f}  lr {rec['lr']:.4g}  {rec['images_per_sec']:.0f} img/s")

    # ---- epochs ------------------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._t0
        self.train_seconds.append(seconds)
        # logs were averaged over ranks by Horovod's MetricAverageCallback, which runs first.
        dist.average_non_trainable(self.model)
        val = self.evaluate()
        # Unreadable images (corrupt, truncated, empty) are skipped per rank; one sum for the job.
        skipped = int(dist.allreduce_sum([self.skips.take() if self.skips else 0],
                                         name="monitor.skips")[0])
        images = self.global_batch * self.steps_per_epoch
        rec = {"kind": "epoch", "epoch": epoch + 1, "step": (epoch + 1) * self.steps_per_epoch,
               "loss": float(logs["loss"]), "top1": float(logs["top1"]),
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "val_count": val["count"], "skipped_images": skipped, "lr": self.lr_fn(), "epoch_seconds": seconds,
               "images_per_sec": images / seconds,
               "images_per_sec_per_rank": images / seconds / self.world.size}
        self.history.append(rec)
        if self.world.is_root:
            append_jsonl(self.metrics_path, rec)
            if skipped:
                self.print(f"warning: {skipped} unreadable images skipped in epoch {epoch + 1} "
                           "(corrupt, truncated or empty files); the run goes on")
            self.print(f"epoch {epoch + 1}/{self.epochs}  loss {rec['loss']:.4f}  top1 {rec['top1']:.3f}  "
                       f"val_loss {val['loss']:.4f}  val_top1 {val['top1']:.3f}  "
                       f"val_top{self.top_k} {val['top5']:.3f}  lr {rec['lr']:.4g}  "
                       f"{rec['images_per_sec']:.0f} img/s ({rec['images_per_sec_per_rank']:.0f}/rank)  "
                       f"{seconds:.1f} s")

    def evaluate(self) -> dict:
        """Exact top-1/top-k over the whole evaluation set: per-rank sums, then one allreduce."""
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.model, self.top_k)
        totals = np.zeros(4)
        for x, y in self.eval_dataset_fn():
            totals += self._eval_step(x, y).numpy()
        loss, top1, topk, n = dist.allreduce_sum(totals, name="monitor.eval")
        n = max(n, 1.0)
        return {"loss": loss / n, "top1": top1 / n, "top5": topk / n, "count": int(n)}


class CheckpointCallback(tf.keras.callbacks.Callback):
    """Rank 0 writes a checkpoint at the end of every epoch."""

    def __init__(self, manager, steps_per_epoch: int):
        super().__init__()
        self.manager = manager
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        self.manager.save(epoch + 1, (epoch + 1) * self.steps_per_epoch)
