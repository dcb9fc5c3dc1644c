"""Where a rank's wall clock goes, from its process start to the summary.

``Timeline`` is shared by the trainer and its two callbacks. Start-up ends in phases
(``mark``: imports, Horovod, data, model, first step); after it, time is either in training
steps, in evaluation or in the training loop waiting on a checkpoint (``spent``), or other
(epoch boundaries, metric averaging, the summary). ``account`` adds it up for ``summary.json``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Dict, Optional

import psutil

# Start-up phases in order; each ends at its mark.
PHASES = ("imports", "horovod", "data", "model", "first_step")


@dataclass(frozen=True)
class Account:
    """The wall clock's parts (they add up to ``wall_seconds``) and what they bought."""
    wall_seconds: float
    startup_seconds: float
    train_seconds: float
    eval_seconds: float
    checkpoint_seconds: float
    other_seconds: float
    startup: Dict[str, float]
    images_trained: int
    wall_images_per_sec: float
    time_to_train_efficiency: Optional[float]

    def text(self) -> str:
        """One line for the log: where the wall clock went."""
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in self.startup.items())
        eff = (f", time-to-train efficiency {self.time_to_train_efficiency:.2f}"
               if self.time_to_train_efficiency is not None else "")
        return (f"wall clock {self.wall_seconds:.1f} s: start-up {self.startup_seconds:.1f} "
                f"({parts}), training {self.train_seconds:.1f}, evaluation {self.eval_seconds:.1f}, "
                f"checkpoints {self.checkpoint_seconds:.1f}, other {self.other_seconds:.1f}; "
                f"{self.wall_images_per_sec:.0f} images/s over the wall clock{eff}")


class Timeline:
    """A rank's clock: start-up marks, then the time spent in each part of the run."""

    _first = True  # the process's first clock starts with the process; a later one, now

    def __init__(self, process_start: Optional[float] = None):
        now_wall, now = time.time(), time.monotonic()
        if process_start is None:
            process_start = psutil.Process().create_time() if Timeline._first else now_wall
            Timeline._first = False
        start_wall = process_start
        # The process start, on the monotonic clock everything else is measured with.
        self.start = now - max(0.0, now_wall - start_wall)
        self.marks: Dict[str, float] = {}
        self.spent_seconds = {"eval": 0.0, "checkpoint": 0.0}
        self._train_from: Optional[float] = None  # the first step's end
        self._train = 0.0
        self._step_from: Optional[float] = None

    def elapsed(self) -> float:
        """Seconds since the process started."""
        return time.monotonic() - self.start

    def mark(self, phase: str) -> None:
        """Start-up phase ``phase`` ends now (the first mark of a phase counts)."""
        if phase not in PHASES:
            raise ValueError(f"unknown start-up phase {phase!r}")
        self.marks.setdefault(phase, time.monotonic())

    @property
    def started(self) -> bool:
        """Start-up is over: the first step has run."""
        return "first_step" in self.marks

    @contextlib.contextmanager
    def spent(self, part: str):
        """Time the block as ``part`` ("eval" or "checkpoint")."""
        t = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - t
            self.spent_seconds[part] += took
            if self._step_from is not None:  # inside an epoch: the block did not train
                self._step_from += took

    def steps_begin(self) -> None:
        """Training steps run from now (an epoch begins)."""
        self._step_from = time.monotonic()

    def step_end(self) -> None:
        """A training step ended: the time since the last one (or the epoch's start) trained."""
        now = time.monotonic()
        if not self.started:
            self.mark("first_step")
        elif self._step_from is not None:
            self._train += now - self._step_from
        self._step_from = now

    def steps_end(self) -> None:
        """The epoch's steps are over; what follows until the next epoch is not training."""
        self._step_from = None

    def startup(self) -> Dict[str, float]:
        """Seconds per start-up phase (phases not reached are left out)."""
        out, last = {}, self.start
        for phase in PHASES:
            if phase in self.marks:
                out[phase] = self.marks[phase] - last
                last = self.marks[phase]
        return out

    def account(self, images_trained: int, steady_images_per_sec: Optional[float]) -> Account:
        wall = time.monotonic() - self.start
        startup = self.startup()
        startup_s = sum(startup.values())
        ev, ck = self.spent_seconds["eval"], self.spent_seconds["checkpoint"]
        eff = (images_trained / steady_images_per_sec / wall
               if steady_images_per_sec and wall > 0 else None)
        return Account(wall_seconds=wall, startup_seconds=startup_s, train_seconds=self._train,
                       eval_seconds=ev, checkpoint_seconds=ck,
                       other_seconds=wall - startup_s - self._train - ev - ck, startup=startup,
                       images_trained=images_trained,
                       wall_images_per_sec=images_trained / wall if wall > 0 else 0.0,
                       time_to_train_efficiency=eff)
