"""How a job's ranks end, and what they tell ``knl-train launch`` about it.

Under Open MPI any rank that exits non-zero costs the job mpirun's whole kill grace (it sleeps
2 x ``odls_base_sigkill_timeout`` before its SIGKILL, measured 20 s with ours, even when every
rank has already gone), and a grace short enough to hide would leave no time for the checkpoint
of a time-limit stop. So ``knl-train launch`` gives its ranks a directory (``RankEnv.outcome``)
where a rank records how it ended: an error (and whether it said it), or a stop by a signal.
A rank whose ending is on record leaves with status 0, after Horovod's shutdown (which tells
the other ranks at once and finalizes MPI), and mpirun ends at once; ``launch`` then reads the
records, prints the stop line or exits non-zero. Without a directory (plain mpirun, srun) the
ranks exit non-zero as usual.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import List, NoReturn, Optional

from knl_train.atomic import write_json_atomic
from knl_train.runtime.rankenv import RankEnv, launcher_rank, launcher_size

# The longest a rank waits for Horovod's shutdown (MPI_Finalize waits for every rank) before it
# leaves anyway: a peer that never arrives must not hold this rank.
SHUTDOWN_SECONDS = 10.0
# What Horovod's collectives raise once any rank has shut Horovod down.
_SHUT_DOWN = "Horovod has been shut down"


def stop_message(signal_name: str, step: int, checkpoint: Optional[str]) -> str:
    """The line a run stopped by a signal ends with (rank 0's, or ``launch``'s for it)."""
    return (f"stopped by {signal_name or 'a signal'} at step {step}: checkpoint "
            f"{checkpoint or 'none'} written; rerun the same command to resume from it")


def directory(environ=None) -> Optional[Path]:
    """The launch's outcome directory, or None when no ``knl-train launch`` started this rank."""
    where = RankEnv.from_environ(environ, ("outcome",)).outcome
    return Path(where) if where else None


def record(kind: str, environ=None, **fields) -> bool:
    """Record this rank's ending (``kind``: "error" or "stopped"); False if there is nowhere to
    record it or the write failed (then the rank must end the usual way)."""
    where = directory(environ)
    if where is None:
        return False
    rank = launcher_rank(environ)
    try:
        write_json_atomic(where / f"rank-{rank:05d}.json", {"rank": rank, "kind": kind, **fields})
    except OSError:
        return False
    return True


def read(where: Path) -> List[dict]:
    """Every rank's record in ``where``, by rank (unreadable ones left out)."""
    out = []
    for path in sorted(Path(where).glob("rank-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rank"), int):
            out.append(data)
    return sorted(out, key=lambda r: r["rank"])


def peer_errors(environ=None) -> List[dict]:
    """Errors other ranks have recorded so far."""
    where = directory(environ)
    me = launcher_rank(environ)
    return [r for r in read(where) if r["rank"] != me and r.get("kind") == "error"] if where else []


def peer_shut_down(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank shut Horovod down."""
    return _SHUT_DOWN in str(error)


def in_job() -> bool:
    return launcher_size() > 1


def horovod_started() -> bool:
    """Whether this process started Horovod (its shutdown then tells every other rank)."""
    hvd = sys.modules.get("horovod.tensorflow")
    try:
        return bool(hvd is not None and hvd.is_initialized())
    except Exception:  # noqa: BLE001  a half-imported Horovod
        return False


def end_rank(code: int) -> NoReturn:
    """Leave now with ``code``: output flushed, Horovod shut down (bounded: a peer that never
    arrives does not hold us), and no interpreter teardown (TensorFlow's can take seconds)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    hvd = sys.modules.get("horovod.tensorflow")
    if hvd is not None:
        # MPI_Finalize inside Horovod's shutdown waits for every rank; past the bound we leave
        # non-zero, and the launcher ends the rest.
        timer = threading.Timer(SHUTDOWN_SECONDS, os._exit, (code or 1,))
        timer.daemon = True
        timer.start()
        try:
            if hvd.is_initialized():
                hvd.shutdown()
        except Exception:  # noqa: BLE001  leaving anyway
            pass
    os._exit(code)
