"""Stop requests from the scheduler: SIGTERM (Slurm and PBS at the time limit, scancel,
qdel) and SIGUSR1 (``#SBATCH --signal=USR1@<seconds>``).

The handler only records the request; the ranks act on it together at their next agreement
(``knl_train.dist.guard``): rank 0 writes a checkpoint and every rank exits cleanly.
"""

from __future__ import annotations

import signal
from typing import Optional

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
        self.signum = signum

    def __enter__(self):
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False
