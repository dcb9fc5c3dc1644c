"""The run's control: where it stands (``Position``) and what keeps it safe (``RunControl``).

Every rank runs ``RunControl``, because the ranks' agreement is a collective that all ranks
must enter in the same order; only rank 0 writes checkpoints. It keeps the run's position
(epoch, batch, optimizer update), watches the loss, and at every ``guard.every``-th update runs
the agreement of ``knl_train.dist.guard``: weight checksums, non-finite losses, stop signals,
timed checkpoints, and each rank's busy step time (stragglers, summed per epoch for the epoch
record). It also writes the epoch checkpoints, and marks the run's progress for the stall
watchdog (``knl_train.dist.watchdog``). Before the loop, ``agree_on_start`` settles where the
run starts (rank 0 decides, every rank learns).
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import tensorflow as tf

from knl_train import records
from knl_train.dist import guard
from knl_train.dist import horovod as dist
from knl_train.dist import watchdog as watching
from knl_train.errors import UserError
from knl_train.train import resume as resuming
from knl_train.train.clock import Timeline


@dataclass
class Position:
    """Where the run stands. One update = ``passes`` micro-batches (gradient accumulation)."""
    updates_per_epoch: int
    passes: int
    total_updates: int
    epoch: int = 0          # the epoch in progress, from 0
    batch: int = 0          # micro-batches done in it
    end_batch: int = 0      # where the epoch in progress stops (the last may be partial)
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

    def enter(self, epoch: int) -> None:
        """Epoch ``epoch`` begins (a resumed one where the checkpoint left it)."""
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0
        self.end_batch = min(self.micro_per_epoch,
                             (self.total_updates - epoch * self.updates_per_epoch) * self.passes)

    def state(self) -> dict:
        """For the checkpoint: the next batch to train (a complete epoch's end is the next one's
        start)."""
        if self.epoch_complete:
            return {"epoch": self.epoch + 1, "batch": 0}
        return {"epoch": self.epoch, "batch": self.batch}


def agree_on_start(world, run_dir: Path, mode: str, global_batch: int, passes: int,
                   resolved: dict) -> Optional[dict]:
    """Rank 0 finds the checkpoint to resume from (or none) and cuts the metrics back to it;
    every rank gets its answer, or its error."""
    def decide() -> Optional[dict]:
        start = resuming.find(run_dir / "checkpoints", mode, global_batch=global_batch,
                              passes=passes, config=resolved)
        if start is not None:
            resuming.trim_metrics(run_dir / records.METRICS, start["step"])
        return start
    return dist.decided_by_root(world, decide, name="knl_train.resume")


class RunControl(tf.keras.callbacks.Callback):
    """Position, loss watch, the ranks' agreement, and checkpoints (written by rank 0)."""

    def __init__(self, *, world, position: Position, guard_every: int, manager,
                 checkpoint_every_epochs: int, checkpoint_every_minutes: Optional[float],
                 stop_request, lr_at: Callable[[int], float], state_extra: dict,
                 timeline: Timeline, last_checkpoint: Optional[str] = None,
                 watchdog: watching.Progress = watching.NO_WATCH,
                 allreduce_wait: Optional[Callable[[], float]] = None):
        super().__init__()
        self.world = world
        self.pos = position
        self.timeline = timeline
        self.guard_every = guard_every
        self.manager = manager  # a CheckpointManager on rank 0, None elsewhere
        self.every_epochs = checkpoint_every_epochs
        self.every_seconds = None if checkpoint_every_minutes is None else checkpoint_every_minutes * 60
        self.stop_request = stop_request
        self.lr_at = lr_at
        self.state_extra = state_extra
        self.first_nonfinite: Optional[int] = None
        self.last_checkpoint = last_checkpoint  # the resumed-from checkpoint, until one is written
        self.saves = 0
        self._last_save = time.monotonic()
        self.watchdog = watchdog
        self.agreements = 0
        self.busy = _BusyClock(world.size, allreduce_wait)
        self.hosts: list = []

    def on_train_begin(self, logs=None):
        # Once per fit (a collective): who each rank is, for the stall and straggler messages.
        ids = dist.allgather_object((socket.gethostname(), os.getpid(), time.time()),
                                    name="knl_train.ranks")
        self.hosts = [host for host, _, _ in ids]
        self.watchdog.arm([(host, pid) for host, pid, _ in ids],
                          token="{}:{}:{:.0f}".format(*ids[0]))

    def on_train_end(self, logs=None):
        self.watchdog.disarm()

    def epoch_stragglers(self) -> dict:
        """The epoch record's straggler fields (none on one rank, or before any agreement)."""
        per_step = self.busy.epoch_per_step()
        return guard.spread(per_step, self.hosts) if per_step is not None else {}

    # ---- steps -------------------------------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        self.pos.enter(epoch)
        self.timeline.steps_begin()
        self.busy.epoch_begins()

    def on_train_batch_begin(self, batch, logs=None):
        self.watchdog.step_begins()
        self.busy.step_begins()

    def on_train_batch_end(self, batch, logs=None):
        self.timeline.step_end()  # first: what follows (checks, a checkpoint) is not training
        pos = self.pos
        pos.batch += 1
        self.busy.step_ends(update=pos.at_update_boundary)
        self.watchdog.step_ends(pos.update)
        if pos.finished:  # a run of ``steps`` ends inside its last epoch
            self.model.stop_training = True
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
        self.watchdog.mark("agreement", tracing=not self.agreements)  # the checksum traces
        self.agreements += 1
        checksum = (guard.weights_checksum(self.model.trainable_variables)
                    if self.world.size > 1 else None)
        busy, updates = self.busy.since_agreement()
        answer = guard.agree(stop=self.stop_request.requested, checkpoint=timed,
                             nonfinite_step=self.first_nonfinite, checksum=checksum,
                             busy_seconds=busy, updates=updates)
        self.busy.agreed(answer)
        self.watchdog.mark("after agreement")
        if answer.nonfinite_step is not None or answer.diverged:
            self.settle()  # the message names the last good checkpoint: let it finish first
        if answer.nonfinite_step is not None:
            s = answer.nonfinite_step
            raise UserError(
                f"the loss is not finite (nan or inf) at step {s} (epoch {(s - 1) // pos.updates_per_epoch + 1}), "
                f"learning rate {self.lr_at(s - 1):.6g}; the last good checkpoint is "
                f"{self.last_checkpoint or 'none (none written yet)'}. Lower schedule.peak_lr or "
                "lengthen schedule.warmup_epochs, then rerun: the run resumes from that checkpoint.")
        if answer.diverged:
            raise UserError(guard.describe_divergence(pos.update, list(answer.checksums)))
        # A timed checkpoint at an epoch's end is left to on_epoch_end; a stop saves here,
        # since on_epoch_end does nothing once the run has stopped.
        if answer.stop or (answer.checkpoint and not pos.epoch_ended):
            self.save(wait=answer.stop)
        if answer.stop:
            pos.stopped = True
            self.model.stop_training = True

    # ---- epochs ------------------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        self.timeline.steps_end()
        if not self.pos.epoch_ended:
            return
        if (epoch + 1) % self.every_epochs == 0 or self.pos.finished:
            # The run's last checkpoint is complete before the run reports success.
            self.save(wait=self.pos.finished)
        else:  # evaluation needs the averaged BN statistics too
            dist.average_non_trainable(self.model)


    def save(self, wait: bool = False):
        """Rank 0 snapshots the model and writes it in the background (``wait``: to the end);
        every rank learns the outcome, so a failed write stops all of them. A background write
        that fails is reported at the next checkpoint or at the end of the run."""
        with self.timeline.spent("checkpoint"):
            self.watchdog.mark("checkpoint", tracing=self.saves == 0)
            # BN moving statistics differ per rank; averaged, every rank holds what rank 0 saves.
            dist.average_non_trainable(self.model)
            self.saves += 1
            error = None
            if self.manager is not None:
                try:
                    self.manager.begin(self.pos.update, {**self.pos.state(), **self.state_extra})
                    if wait:
                        self.manager.wait()
                except UserError as e:
                    error = str(e)
                except Exception as e:  # noqa: BLE001  every rank must still hear of it
                    error = (f"could not write the checkpoint of step {self.pos.update}: "
                             f"{type(e).__name__}: {e}")
                self._note_written()
            self._last_save = time.monotonic()
            self.watchdog.mark("checkpoint (outcome)")
            error = dist.broadcast_object(error, name="knl_train.checkpoint")
            self.watchdog.mark("after checkpoint")
        if error:
            raise UserError(error)

    def settle(self) -> None:
        """Rank 0: let the write in flight finish (its error, if any, is not this caller's)."""
        if self.manager is None:
            return
        with self.timeline.spent("checkpoint"):
            try:
                self.manager.wait()
            except UserError:
                pass
            self._note_written()

    def _note_written(self) -> None:
        if self.manager.last_written is not None:
            self.last_checkpoint = str(self.manager.last_written)


class _BusyClock:
    """This rank's busy time (its training steps' wall time less their wait in the gradient
    allreduce) since the last agreement, and every rank's over the epoch, from the agreements.

    The run's first step (graph tracing) and its wait are left out, on every rank alike. Nothing
    is measured on one rank, or without the allreduce's clock (``allreduce_wait`` None: under op
    determinism), since wall step times alone are the same on every rank."""

    def __init__(self, size: int, allreduce_wait: Optional[Callable[[], float]]):
        self.size = size if allreduce_wait is not None else 1
        self.waited = allreduce_wait
        self._began = 0.0
        self._busy = 0.0          # step wall seconds since the last agreement
        self._updates = 0
        self._steps = 0           # steps seen in this fit
        self._wait_mark = 0.0
        self._epoch_busy = [0.0] * size
        self._epoch_updates = [0] * size

    def epoch_begins(self) -> None:
        self._epoch_busy, self._epoch_updates = [0.0] * self.size, [0] * self.size

    def step_begins(self) -> None:
        self._began = time.perf_counter()

    def step_ends(self, update: bool) -> None:
        self._steps += 1
        if self.size == 1:  # nobody to compare with
            return
        if self._steps == 1:  # tracing: neither its time nor its wait counts
            self._wait_mark = self.waited()
            return
        self._busy += time.perf_counter() - self._began
        self._updates += int(update)

    def since_agreement(self):
        """(busy seconds, optimizer updates) since the last agreement."""
        if self.size == 1:
            return 0.0, 0
        if not self._updates:
            return 0.0, 0
        return max(0.0, self._busy - (self.waited() - self._wait_mark)), self._updates

    def agreed(self, answer) -> None:
        if self.size == 1:
            return
        self._wait_mark = self.waited()
        self._busy, self._updates = 0.0, 0
        for r, (b, u) in enumerate(zip(answer.busy_seconds, answer.updates)):
            self._epoch_busy[r] += b
            self._epoch_updates[r] += u

    def epoch_per_step(self):
        """Every rank's busy seconds per optimizer update over the epoch, or None."""
        if self.size == 1 or not all(self._epoch_updates):
            return None
        return [b / u for b, u in zip(self._epoch_busy, self._epoch_updates)]
