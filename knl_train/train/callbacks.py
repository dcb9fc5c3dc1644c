"""Keras callbacks of the trainer.

Every rank runs them, because metric averaging, evaluation and the ranks' agreement are
collectives that all ranks must enter in the same order; only rank 0 prints and writes.

* ``RunControl`` keeps the run's position (epoch, batch, optimizer update), watches the loss,
  and at every ``guard_every``-th update runs the agreement of ``knl_train.dist.guard``:
  weight checksums, non-finite losses, stop signals, timed checkpoints. It also writes the
  epoch checkpoints.
* ``TrainingMonitor`` records metrics (``metrics.jsonl``, TensorBoard, progress) and runs the
  sharded evaluation.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf

from knl_train.dist import guard
from knl_train.dist import horovod as dist
from knl_train.runtime.rankenv import under_launcher
from knl_train.errors import UserError
from knl_train.atomic import append_jsonl


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
        logits = tf.cast(model(x, training=False), tf.float32)
        y = tf.cast(y, tf.int32)
        loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        top1 = tf.cast(tf.math.in_top_k(y, logits, 1), tf.float64)
        topk = tf.cast(tf.math.in_top_k(y, logits, top_k), tf.float64)
        return tf.stack([tf.reduce_sum(tf.cast(loss, tf.float64)), tf.reduce_sum(top1),
                         tf.reduce_sum(topk), tf.cast(tf.shape(y)[0], tf.float64)])
    return eval_step


@dataclass
class Position:
    """Where the run stands. One update = ``passes`` micro-batches (gradient accumulation)."""
    updates_per_epoch: int
    passes: int
    total_updates: int
    epoch: int = 0          # the epoch in progress, from 0
    batch: int = 0          # micro-batches done in it
    end_batch: int = 0      # where the current fit call stops
    stopped: bool = False   # a stop request ended the run early

    @property
    def micro_per_epoch(self) -> int:
        return self.updates_per_epoch * self.passes

    @property
    def update(self) -> int:
        """Optimizer updates done."""
        return self.epoch * self.updates_per_epoch + self.batch // self.passes

    @property
    def at_update_boundary(self) -> bool:
        return self.batch % self.passes == 0

    @property
    def epoch_complete(self) -> bool:
        return self.batch >= self.micro_per_epoch

    @property
    def finished(self) -> bool:
        return self.update >= self.total_updates

    @property
    def epoch_ended(self) -> bool:
        """The epoch is over: complete, or the run's last (partial) one, and not stopped."""
        return not self.stopped and (self.epoch_complete or self.finished)

    def state(self) -> dict:
        """For the checkpoint: the next batch to train (a complete epoch's end is the next one's
        start)."""
        if self.epoch_complete:
            return {"epoch": self.epoch + 1, "batch": 0}
        return {"epoch": self.epoch, "batch": self.batch}


class RunControl(tf.keras.callbacks.Callback):
    """Position, loss watch, the ranks' agreement, and checkpoints (written by rank 0)."""

    def __init__(self, *, world, position: Position, guard_every: int, manager,
                 checkpoint_every_epochs: int, checkpoint_every_minutes: Optional[float],
                 stop_request, lr_at: Callable[[int], float], state_extra: dict, print_fn=print):
        super().__init__()
        self.world = world
        self.pos = position
        self.guard_every = guard_every
        self.manager = manager  # a CheckpointManager on rank 0, None elsewhere
        self.every_epochs = checkpoint_every_epochs
        self.every_seconds = None if checkpoint_every_minutes is None else checkpoint_every_minutes * 60
        self.stop_request = stop_request
        self.lr_at = lr_at
        self.state_extra = state_extra
        self.print = print_fn
        self.first_nonfinite: Optional[int] = None
        self.last_checkpoint: Optional[str] = None
        self._last_save = time.monotonic()

    # ---- steps -------------------------------------------------------------------------------
    def on_train_batch_end(self, batch, logs=None):
        pos = self.pos
        pos.batch += 1
        if self.first_nonfinite is None and not math.isfinite(float(logs["loss"])):
            # The running epoch mean turns non-finite at the first bad micro-batch.
            self.first_nonfinite = pos.update + (0 if pos.at_update_boundary else 1)
        if not pos.at_update_boundary:
            return
        if pos.update % self.guard_every and pos.batch < pos.end_batch:
            return
        self.check()

    def check(self):
        """The agreement (every rank, same step); acts on its answer."""
        pos = self.pos
        timed = (self.world.is_root and self.every_seconds is not None
                 and time.monotonic() - self._last_save >= self.every_seconds)
        checksum = (guard.weights_checksum(self.model.trainable_variables)
                    if self.world.size > 1 else None)
        answer = guard.agree(stop=self.stop_request.requested, checkpoint=timed,
                             nonfinite_step=self.first_nonfinite, checksum=checksum)
        if answer.nonfinite_step is not None:
            s = answer.nonfinite_step
            raise UserError(
                f"the loss is not finite (nan or inf) at step {s} (epoch {(s - 1) // pos.updates_per_epoch + 1}), "
                f"learning rate {self.lr_at(s - 1):.6g}; the last good checkpoint is "
                f"{self.last_checkpoint or 'none (none written yet)'}. Lower schedule.peak_lr or "
                "lengthen schedule.warmup_epochs, then rerun: the run resumes from that checkpoint.")
        if answer.diverged:
            raise UserError(guard.describe_divergence(pos.update, guard.checksums_by_rank(checksum)))
        # A timed checkpoint at an epoch's end is left to on_epoch_end; a stop saves here,
        # since on_epoch_end does nothing once the run has stopped.
        if answer.stop or (answer.checkpoint and not pos.epoch_ended):
            self.save()
        if answer.stop:
            pos.stopped = True
            self.model.stop_training = True

    # ---- epochs ------------------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        if not self.pos.epoch_ended:
            return
        if (epoch + 1) % self.every_epochs == 0 or self.pos.finished:
            self.save()
        else:  # evaluation needs the averaged BN statistics too
            dist.average_non_trainable(self.model)

    def save(self):
        """Rank 0 writes; every rank learns the outcome, so a failed write stops all of them."""
        # BN moving statistics differ per rank; averaged, every rank holds what rank 0 saves.
        dist.average_non_trainable(self.model)
        error = None
        if self.manager is not None:
            try:
                path = self.manager.save(self.pos.update, {**self.pos.state(), **self.state_extra})
                self.last_checkpoint = str(path)
            except UserError as e:
                error = str(e)
        self._last_save = time.monotonic()
        error = dist.broadcast_object(error, name="knl_train.checkpoint")
        if error:
            raise UserError(error)


class TrainingMonitor(tf.keras.callbacks.Callback):
    """Per-step and per-epoch metrics, averaged over ranks; evaluation sharded over ranks."""

    def __init__(self, *, world, position: Position, global_batch: int, epochs: int,
                 eval_dataset_fn: Callable[[], tf.data.Dataset], eval_every: int, num_classes: int,
                 metrics_path: Optional[str], log_dir: Optional[str], log_every: int,
                 lr_fn: Callable[[], float], skips=None, print_fn=print):
        super().__init__()
        self.world = world
        self.pos = position
        self.global_batch = global_batch
        self.epochs = epochs
        self.eval_dataset_fn = eval_dataset_fn
        self.eval_every = eval_every
        self.top_k = min(5, num_classes)
        self.metrics_path = metrics_path if world.is_root else None
        self.log_every = log_every
        self.lr_fn = lr_fn
        self.skips = skips
        self.print = print_fn
        self.history: List[dict] = []
        self._writer = tf.summary.create_file_writer(log_dir) if log_dir and world.is_root else None
        self._eval_step = None
        self._progbar = None
        self._tty = world.is_root and progress_mode() == "bar"

    # ---- training steps ------------------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = self._t_last = self._t_end = time.perf_counter()
        self._first_batch = self.pos.batch
        self._update_last = self.pos.update
        if self._tty:
            self._progbar = tf.keras.utils.Progbar(self.pos.micro_per_epoch, stateful_metrics=["lr"])

    def on_train_batch_end(self, batch, logs=None):
        pos = self.pos
        # The epoch's training time ends here, before the epoch-end work (checkpoint, evaluation).
        self._t_end = time.perf_counter()
        if self._progbar is not None:
            self._progbar.update(pos.batch, [("loss", logs["loss"]), ("top1", logs["top1"]),
                                             ("lr", self.lr_fn())])
        if not pos.at_update_boundary:
            return
        if pos.update % self.log_every and pos.batch < pos.end_batch:
            return
        # Running epoch means, averaged over ranks (a collective: every rank is here).
        loss, top1, top5 = dist.allreduce_mean([logs["loss"], logs["top1"], logs["top5"]],
                                               name="monitor.step")
        now = time.perf_counter()
        n_updates = max(1, pos.update - self._update_last)
        dt = (now - self._t_last) / n_updates
        self._t_last, self._update_last = now, pos.update
        rec = {"kind": "step", "step": pos.update, "epoch": pos.epoch + 1, "loss": float(loss),
               "top1": float(top1), "top5": float(top5), "lr": self.lr_fn(), "step_seconds": dt,
               "images_per_sec": self.global_batch / dt,
               "images_per_sec_per_rank": self.global_batch / dt / self.world.size}
        if self.world.is_root:
            append_jsonl(self.metrics_path, rec)
            self._scalars(rec, "train", ("loss", "top1", "top5", "lr", "images_per_sec"))
            if not self._tty:
                self.print(f"  step {pos.update:6d}  epoch {pos.epoch + 1}/{self.epochs}  loss {loss:.4f}  "
                           f"top1 {top1:.3f}  lr {rec['lr']:.4g}  {rec['images_per_sec']:.0f} img/s")

    # ---- epochs ------------------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        seconds = self._t_end - self._t0
        if not self.pos.epoch_ended:
            return
        # logs were averaged over ranks by Horovod's MetricAverageCallback, which runs first.
        due = (epoch + 1) % self.eval_every == 0 or self.pos.finished
        val = self.evaluate() if due else None
        # Unreadable images (corrupt, truncated, empty) are skipped per rank; one sum for the job.
        skipped = int(dist.allreduce_sum([self.skips.take() if self.skips else 0],
                                         name="monitor.skips")[0])
        images = self.global_batch * (self.pos.batch - self._first_batch) // self.pos.passes
        rec = {"kind": "epoch", "epoch": epoch + 1, "step": self.pos.update,
               "loss": float(logs["loss"]), "top1": float(logs["top1"]), "top5": float(logs["top5"]),
               **({f"val_{k}": v for k, v in val.items()} if val else {}),
               "skipped_images": skipped, "lr": self.lr_fn(), "epoch_seconds": seconds,
               "images_per_sec": images / seconds,
               "images_per_sec_per_rank": images / seconds / self.world.size}
        self.history.append(rec)
        if self.world.is_root:
            append_jsonl(self.metrics_path, rec)
            self._scalars(rec, "epoch", ("loss", "top1", "top5", "images_per_sec"))
            if val:
                self._scalars(val, "val", ("loss", "top1", "top5"), step=self.pos.update)
            if skipped:
                self.print(f"warning: {skipped} unreadable images skipped in epoch {epoch + 1} "
                           "(corrupt, truncated or empty files); the run goes on")
            text = (f"  val_loss {val['loss']:.4f}  val_top1 {val['top1']:.3f}  "
                    f"val_top{self.top_k} {val['top5']:.3f}") if val else ""
            self.print(f"epoch {epoch + 1}/{self.epochs}  loss {rec['loss']:.4f}  top1 {rec['top1']:.3f}"
                       f"{text}  lr {rec['lr']:.4g}  "
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

    def _scalars(self, rec, prefix, keys, step=None):
        if self._writer is None:
            return
        with self._writer.as_default(step=rec.get("step", 0) if step is None else step):
            for k in keys:
                tf.summary.scalar(f"{prefix}/{k}", rec[k])

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
