"""Stop requests from the scheduler: SIGTERM (Slurm and PBS at the time limit, scancel,
qdel) and SIGUSR1 (``#SBATCH --signal=USR1@<seconds>``).

The handler only records the request; the ranks act on it together at their next agreement
(``knl_train.dist.guard``): rank 0 writes a checkpoint and every rank exits cleanly. The first
signal is the one named: a launcher that turns a SIGTERM into a SIGUSR1 for mpirun to forward
must not rename the scheduler's SIGTERM.
"""

from __future__ import annotations

import signal
from typing import Optional

from knl_train import log as knl_log
from knl_train.runtime import outcome

log = knl_log.get(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def __enter__(self):
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def announce_stop(signal_name: str, step: int, checkpoint: Optional[str], *, is_root: bool) -> None:
    """Rank 0 says how the run stopped. Under ``knl-train launch`` it goes on record instead and
    launch prints the line itself: mpirun, signalled too at a time limit, may not pass a rank's
    last lines on, and launch's own output is what the batch log keeps."""
    if not is_root:
        return
    if not outcome.record("stopped", signal=signal_name, step=step, checkpoint=checkpoint):
        log.info(outcome.stop_message(signal_name, step, checkpoint), extra=knl_log.STDOUT)
