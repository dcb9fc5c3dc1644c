"""Per-layer trust ratios as training metrics: no public LARS exposes them."""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf

from knl_train import records


class TrustRatioMonitor(tf.keras.callbacks.Callback):
    """Every ``every`` batches: min, median and max of the adapted variables' trust ratios.

    Records go to ``history``, to a JSON-lines file if ``jsonl_path`` is given, and to
    TensorBoard (three scalars, and a histogram every ``histogram_every``-th record, since it
    costs a few milliseconds) if ``log_dir`` is given. Works with any
    optimizer that has ``trust_ratios()`` (LARS, LAMB), Horovod-wrapped or not.
    """

    def __init__(self, every: int = 100, log_dir: Optional[str] = None,
                 jsonl_path: Optional[str] = None, step_fn: Optional[Callable[[], int]] = None,
                 histogram_every: int = 10):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.jsonl_path = jsonl_path
        self.histogram_every = histogram_every
        self.history: List[dict] = []
        self._writer = tf.summary.create_file_writer(str(log_dir)) if log_dir else None
        # The optimizer update count; by default its iterations (which, under gradient
        # accumulation, count micro-batches: pass the update count then).
        self._step_fn = step_fn or (lambda: int(self.model.optimizer.iterations.numpy()))
        self._batches = 0
        self._last = None

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        step = self._step_fn()
        if step % self.every or step == self._last:
            return
        self._last = step
        ratios = getattr(self.model.optimizer, "trust_ratios", lambda: {})()
        if not ratios:
            return
        names = list(ratios)
        values = np.array([ratios[n] for n in names])
        record = records.TrustRatioRecord(
            step=step, batch=self._batches, count=len(values), min=float(values.min()),
            median=float(np.median(values)), max=float(values.max()),
            argmin=names[int(values.argmin())], argmax=names[int(values.argmax())])
        self.history.append(record.to_dict())
        if self.jsonl_path:
            records.append(self.jsonl_path, record)
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for stat in ("min", "median", "max"):
                    tf.summary.scalar(f"trust_ratio/{stat}", getattr(record, stat))
                if (len(self.history) - 1) % self.histogram_every == 0:
                    tf.summary.histogram("trust_ratio", values)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
