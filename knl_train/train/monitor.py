"""The run's metrics: ``TrainingMonitor`` records steps and epochs and runs the evaluation.

Every rank runs it, because metric averaging and the sharded evaluation are collectives that all
ranks must enter in the same order; only rank 0 writes (``metrics.jsonl`` through
``knl_train.records``, TensorBoard) and prints the progress lines.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf

from knl_train import log as knl_log
from knl_train import records
from knl_train.dist import horovod as dist
from knl_train.dist import watchdog as watching
from knl_train.errors import UserError
from knl_train.runtime.rankenv import RankEnv, under_launcher
from knl_train.train.clock import Timeline
from knl_train.train.control import Position

log = knl_log.get(__name__)


def progress_mode() -> str:
    """'bar' for a person at a terminal, 'lines' for batch logs.

    Under mpirun every rank's stdout is a pty even in a batch job, so the launcher passes what it
    saw in KNL_TRAIN_PROGRESS; without it, a rank under MPI assumes a log file.
    """
    mode = RankEnv.from_environ().progress
    if mode in ("bar", "lines"):
        return mode
    return "bar" if sys.stdout.isatty() and not under_launcher() else "lines"


def make_eval_step(model, top_k: int):
    @tf.function(autograph=False)  # plain TensorFlow: no conversion to pay for at the first call
    def eval_step(x, y):
        logits = tf.cast(model(x, training=False), tf.float32)
        y = tf.cast(y, tf.int32)
        loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        top1 = tf.cast(tf.math.in_top_k(y, logits, 1), tf.float64)
        topk = tf.cast(tf.math.in_top_k(y, logits, top_k), tf.float64)
        return tf.stack([tf.reduce_sum(tf.cast(loss, tf.float64)), tf.reduce_sum(top1),
                         tf.reduce_sum(topk), tf.cast(tf.shape(y)[0], tf.float64)])
    return eval_step


class TrainingMonitor(tf.keras.callbacks.Callback):
    """Per-step and per-epoch metrics, averaged over ranks; evaluation sharded over ranks."""

    def __init__(self, *, world, position: Position, global_batch: int, epochs: int,
                 eval_dataset_fn: Callable[[], tf.data.Dataset], eval_every: int, num_classes: int,
                 metrics_path: Optional[str], log_dir: Optional[str], log_every: int,
                 lr_fn: Callable[[], float], timeline: Timeline, skips=None,
                 stragglers: Callable[[], dict] = dict,
                 watchdog: watching.Progress = watching.NO_WATCH):
        super().__init__()
        self.world = world
        self.pos = position
        self.timeline = timeline
        self._eval_ds: Optional[tf.data.Dataset] = None  # built once (and cached, if asked)
        self.global_batch = global_batch
        self.epochs = epochs
        self.eval_dataset_fn = eval_dataset_fn
        self.eval_every = eval_every
        self.top_k = min(5, num_classes)
        self.metrics_path = metrics_path if world.is_root else None
        self.log_every = log_every
        self.lr_fn = lr_fn
        self.skips = skips
        self.stragglers = stragglers  # the epoch record's straggler fields (train.control)
        self.watchdog = watchdog      # progress marks for the stall watchdog (dist.watchdog)
        self.history: List[records.EpochRecord] = []
        self._log_dir = log_dir
        self._writer = tf.summary.create_file_writer(log_dir) if log_dir and world.is_root else None
        self._eval_step = None
        self._progbar = None
        self._tty = world.is_root and progress_mode() == "bar"

    # ---- training steps ------------------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = self._t_last = self._t_end = time.perf_counter()
        self._checkpoint_mark = self._checkpoint_end = self.timeline.spent_seconds["checkpoint"]
        self._first_batch = self.pos.batch
        self._update_last = self.pos.update
        if self._tty:
            self._progbar = tf.keras.utils.Progbar(self.pos.micro_per_epoch, stateful_metrics=["lr"])

    def on_train_batch_end(self, batch, logs=None):
        pos = self.pos
        # The epoch's training time ends here, before the epoch-end work (checkpoint, evaluation);
        # a checkpoint written inside the epoch (timed, or a stop) is not training either.
        self._t_end = time.perf_counter()
        self._checkpoint_end = self.timeline.spent_seconds["checkpoint"]
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
        rec = records.StepRecord(
            step=pos.update, epoch=pos.epoch + 1, loss=float(loss), top1=float(top1),
            top5=float(top5), lr=self.lr_fn(), step_seconds=dt,
            images_per_sec=self.global_batch / dt,
            images_per_sec_per_rank=self.global_batch / dt / self.world.size)
        if self.world.is_root:
            records.append(self.metrics_path, rec)
            self._scalars("train", rec, ("loss", "top1", "top5", "lr", "images_per_sec"), rec.step)
            if not self._tty:
                log.info(f"  step {pos.update:6d}  epoch {pos.epoch + 1}/{self.epochs}  loss {loss:.4f}  "
                         f"top1 {top1:.3f}  lr {rec.lr:.4g}  {rec.images_per_sec:.0f} img/s",
                         extra=knl_log.PROGRESS)

    # ---- epochs ------------------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        seconds = self._t_end - self._t0 - (self._checkpoint_end - self._checkpoint_mark)
        if not self.pos.epoch_ended:
            return
        # logs were averaged over ranks by Horovod's MetricAverageCallback, which runs first.
        due = (epoch + 1) % self.eval_every == 0 or self.pos.finished
        spent = dict(self.timeline.spent_seconds)
        with self.timeline.spent("eval"):
            val = self.evaluate() if due else None
        # Unreadable images (corrupt, truncated, empty) are skipped per rank; one sum for the job.
        skipped = int(dist.allreduce_sum([self.skips.take() if self.skips else 0],
                                         name="monitor.skips")[0])
        images = self.global_batch * (self.pos.batch - self._first_batch) // self.pos.passes
        rec = records.EpochRecord(
            epoch=epoch + 1, step=self.pos.update, loss=float(logs["loss"]),
            top1=float(logs["top1"]), top5=float(logs["top5"]),
            **({f"val_{k}": v for k, v in val.items()} if val else {}),
            skipped_images=skipped, lr=self.lr_fn(), epoch_seconds=seconds,
            eval_seconds=self.timeline.spent_seconds["eval"] - spent["eval"] if val else None,
            checkpoint_seconds=self.timeline.spent_seconds["checkpoint"] - self._checkpoint_mark,
            images_per_sec=images / seconds, images_per_sec_per_rank=images / seconds / self.world.size,
            wall_seconds=self.timeline.elapsed(), **self.stragglers())
        self.history.append(rec)
        if self.world.is_root:
            records.append(self.metrics_path, rec)
            self._scalars("epoch", rec, ("loss", "top1", "top5", "images_per_sec"), rec.step)
            if val:
                self._scalars("val", val, ("loss", "top1", "top5"), self.pos.update)
            self._print_epoch(rec, val, skipped)

    def _print_epoch(self, rec: records.EpochRecord, val: Optional[Dict[str, float]], skipped: int):
        if skipped:
            log.warning(f"{skipped} unreadable images skipped in epoch {rec.epoch} "
                        "(corrupt, truncated or empty files); the run goes on", extra=knl_log.STDOUT)
        text = (f"  val_loss {val['loss']:.4f}  val_top1 {val['top1']:.3f}  "
                f"val_top{self.top_k} {val['top5']:.3f}") if val else ""
        log.info(f"epoch {rec.epoch}/{self.epochs}  loss {rec.loss:.4f}  top1 {rec.top1:.3f}"
                 f"{text}  lr {rec.lr:.4g}  "
                 f"{rec.images_per_sec:.0f} img/s ({rec.images_per_sec_per_rank:.0f}/rank)  "
                 f"{rec.epoch_seconds:.1f} s", extra=knl_log.PROGRESS)

    def evaluate(self) -> dict:
        """Exact top-1/top-k over the whole evaluation set: per-rank sums, then one allreduce."""
        self.watchdog.mark("evaluation", tracing=self._eval_step is None)
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.model, self.top_k)
        if self._eval_ds is None:
            self._eval_ds = self.eval_dataset_fn()
        totals = np.zeros(4)
        for x, y in self._eval_ds:
            totals += self._eval_step(x, y).numpy()
            self.watchdog.mark("evaluation")
        loss, top1, topk, n = dist.allreduce_sum(totals, name="monitor.eval")
        n = max(n, 1.0)
        return {"loss": loss / n, "top1": top1 / n, "top5": topk / n, "count": int(n)}

    def _scalars(self, prefix: str, values, keys, step: int):
        if self._writer is None:
            return
        get = values.get if isinstance(values, dict) else lambda k: getattr(values, k)
        with tensorboard_errors(self._log_dir), self._writer.as_default(step=step):
            for k in keys:  # the writer flushes when the block ends
                tf.summary.scalar(f"{prefix}/{k}", get(k))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            with tensorboard_errors(self._log_dir):
                self._writer.flush()


@contextlib.contextmanager
def tensorboard_errors(log_dir):
    """A failed TensorBoard write (full disk, read-only file system) as one ``UserError`` line
    naming the events file and the OS's reason; TF puts both on its message's first line."""
    try:
        yield
    except tf.errors.OpError as e:
        lines = (e.message or str(e)).strip().splitlines() or [""]
        detail = re.sub(r"\{\{[^}]*\}\}\s*", "", lines[0]).strip() or type(e).__name__
        raise UserError(f"could not write TensorBoard events in {log_dir}: {detail}; free space "
                        "or fix the run directory's permissions, then rerun to resume from the "
                        "last checkpoint") from None
