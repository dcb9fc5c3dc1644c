"""Stall detection: a rank that makes no progress ends the job, naming the ranks that stalled.

In lock-step data parallel training, one rank that stops (SIGSTOP, a dead file system, a FIFO
among the images, a deadlock) blocks every other rank in its next collective, at 100% CPU and
without a word, until the wall-clock limit. Horovod's own stall inspector only warns; its
shutdown switch did not end a SIGSTOPped rank's job.

Each rank runs a ``Watchdog``: a daemon thread that watches the main thread's progress marks
(step begins and ends, evaluation batches, checkpoint phases, the agreements). When a rank has
made no progress for ``guard.stall_seconds`` plus its longest step so far, its watchdog writes a
small report, ``<run_dir>/stall/rank-NNNNN.json`` (step, phase, input batches taken, where the
main thread is), then waits a short grace for the others' reports. The file system is the side
channel because the collectives are what is blocked; nothing is written before a stall, so the
watch costs no I/O at any scale. The assumption: ``run_dir`` is on a file system every rank sees
(as studies use); without it the message names only what its rank can see.

The lowest rank that reported prints one line: the ranks that never reported (stopped, hung,
node lost), those waiting for input (a blocked read, a starved pipeline), and where the rest
waited. It then leaves with ``os._exit(EXIT_CODE)``; the launcher (mpirun, horovodrun) kills the
rest, and every other reporting rank leaves by itself after a further grace. ``os._exit``
because the main thread sits in a collective that no exception can interrupt.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from knl_train import log as knl_log
from knl_train.atomic import write_json_atomic

log = knl_log.get(__name__)

EXIT_CODE = 3  # a stall (2: a user error)
DIRECTORY = "stall"
_SHOWN = 8  # ranks named per group; the rest are counted


class Progress:
    """The progress marks the training loop makes; this base watches nothing (stall detection
    off, or a single process that a hang cannot leave without a word)."""

    def mark(self, phase: str, step: Optional[int] = None, tracing: bool = False) -> None:
        """The main thread made progress and is now in ``phase`` ("step", "evaluation",
        "checkpoint", ...); ``step``: the optimizer updates done, when it changes; ``tracing``:
        until the next mark it may trace a graph (a first step, evaluation or checkpoint)."""

    def step_begins(self) -> None:
        """A training (micro-)step begins: its input batch is taken inside it."""

    def step_ends(self, step: int) -> None:
        """A training (micro-)step ended; ``step`` optimizer updates are done."""

    def counted(self, dataset):
        """``dataset``, counting the batches made for the training step (tf.data's injected
        prefetch may make one or more ahead; a rank starved of input has taken no more batches
        than it has done steps, while one waiting in a collective has taken its step's)."""
        return dataset

    def arm(self, identities: Sequence[Tuple[str, int]], token: str) -> None:
        """Training starts: watch from now. ``identities``: every rank's (host, pid)."""

    def disarm(self) -> None:
        """Training is over (or between two fits): stop watching."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disarm()


NO_WATCH = Progress()


class Watchdog(Progress):
    """One rank's watch over its own progress (see the module's docstring)."""

    def __init__(self, run_dir, *, rank: int, size: int, stall_seconds: float,
                 startup_seconds: float = 0.0):
        self.dir = Path(run_dir) / DIRECTORY
        self.rank, self.size = rank, size
        self.stall_seconds = float(stall_seconds)
        # A first step, evaluation or checkpoint traces a graph: it may take as long as the
        # start-up (which built the model) did.
        self.tracing_allowance = float(startup_seconds)
        self._allowance = 0.0
        self.poll = min(1.0, self.stall_seconds / 10)
        self.step = 0            # optimizer updates done
        self.done = 0            # micro-steps done since armed
        self.taken = 0           # input batches the training step took since armed
        self.phase = "start"
        self.longest = 0.0       # the longest step so far (the first, which traces, excluded)
        self._last = time.monotonic()
        self._step_began: Optional[float] = None
        self._armed = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.identities: List[Tuple[str, int]] = []
        self.token = ""

    # ---- the main thread's marks -------------------------------------------------------------
    def mark(self, phase: str, step: Optional[int] = None, tracing: bool = False) -> None:
        self._last = time.monotonic()
        self._allowance = self.tracing_allowance if tracing else 0.0
        self.phase = phase
        if step is not None:
            self.step = step

    def step_begins(self) -> None:
        self.mark("step", tracing=self.done == 0)
        self._step_began = self._last

    def step_ends(self, step: int) -> None:
        now = time.monotonic()
        if self._step_began is not None and self.done > 0:
            self.longest = max(self.longest, now - self._step_began)
        self.done += 1
        self.mark("after step", step)

    def _take(self):
        self.taken += 1
        return 0

    def counted(self, dataset):
        import tensorflow as tf

        @tf.autograph.experimental.do_not_convert  # plain TF: no conversion, no warning
        def count(*element):
            tick = tf.py_function(self._take, [], tf.int32)  # when the step takes the batch
            with tf.control_dependencies([tick]):
                out = tuple(tf.nest.map_structure(tf.identity, e) for e in element)
            return out if len(out) > 1 else out[0]
        return dataset.map(count)

    # ---- arming --------------------------------------------------------------------------------
    def arm(self, identities: Sequence[Tuple[str, int]], token: str) -> None:
        self.identities, self.token = [tuple(i) for i in identities], token
        if self.rank == 0:  # another run's reports would only confuse the next stall
            for old in self.dir.glob("rank-*.json"):
                old.unlink(missing_ok=True)
        self._last = time.monotonic()
        self._armed.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="knl-train watchdog",
                                            daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        self._armed.clear()

    def limit(self) -> float:
        """Seconds without progress that make a stall, now."""
        return self.stall_seconds + max(self.longest, self._allowance)

    # ---- the watching thread -----------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            if not self._armed.is_set():
                continue
            quiet = time.monotonic() - self._last
            if quiet > self.limit():
                self._stalled(quiet)
                return

    def _stalled(self, quiet: float) -> None:
        """Report, wait for the others' reports, then the lowest reporter says it; all leave."""
        grace = max(3.0, 4 * self.poll) + min(self.longest, 30.0)
        mine = self.report(quiet)
        _with_timeout(lambda: write_json_atomic(self.dir / f"rank-{self.rank:05d}.json", mine),
                      grace)
        deadline = time.monotonic() + grace
        reports: Dict[int, dict] = {}
        while True:
            found = _with_timeout(lambda: read_reports(self.dir, self.token), grace)
            reports = found if found else reports
            if len(reports) >= self.size or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, grace / 6))
        reports.setdefault(self.rank, mine)
        if min(reports) == self.rank:
            log.error(describe(reports, self.identities, self.size, quiet, self.limit()),
                      extra=knl_log.EVERY_RANK)
        else:  # the lowest reporter speaks and leaves (within a grace of this rank, since
            # the ranks fire within a step of each other); the launcher may end this one first
            self._stop.wait(grace)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EXIT_CODE)

    def report(self, quiet: float) -> dict:
        """What this rank says about itself at a stall."""
        host, pid = (self.identities[self.rank] if self.rank < len(self.identities)
                     else (socket.gethostname(), os.getpid()))
        return {"token": self.token, "rank": self.rank, "host": host, "pid": pid,
                "step": self.step, "done": self.done, "taken": self.taken, "phase": self.phase,
                "quiet_seconds": round(quiet, 1), "where": main_thread_location()}


def read_reports(directory: Path, token: str) -> Dict[int, dict]:
    """The stall reports of this run (``token``) in ``directory``, by rank."""
    out: Dict[int, dict] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        if not (name.startswith("rank-") and name.endswith(".json")):
            continue
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("token") == token and isinstance(data.get("rank"), int):
            out[data["rank"]] = data
    return out


def main_thread_location() -> str:
    """The innermost knl-train frame of the main thread ("file.py:line in function")."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return ""
    stack = [f for f in traceback.extract_stack(frame) if f.filename != __file__]
    ours = [f for f in stack if f"{os.sep}knl_train{os.sep}" in f.filename]
    f = ours[-1] if ours else stack[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def describe(reports: Dict[int, dict], identities: Sequence[Tuple[str, int]], size: int,
             quiet: float, limit: float) -> str:
    """The one line: who stalled, where each group stands, and what to do."""
    silent = [r for r in range(size) if r not in reports]
    starved = [r for r, x in sorted(reports.items())
               if x.get("phase") == "step" and x.get("taken", 0) <= x.get("done", 0)]
    steps = [x.get("step", 0) for x in reports.values()]
    parts = []
    if silent:
        who = _ranks(silent, identities)
        parts.append(f"{who} stopped responding after step {min(steps) if steps else '?'} "
                     "(stopped, hung, or its node lost)")
    if starved:
        parts.append(f"{_ranks(starved, identities)} waited for input after step "
                     f"{_steps(reports, starved)} (a read that does not return, or a data "
                     "pipeline that yields nothing)")
    rest: Dict[str, List[int]] = {}
    for r, x in sorted(reports.items()):
        if r not in starved:
            if x.get("phase") == "step":
                where = f"in step {x.get('step', 0) + 1}"
            else:
                where = f"in {x.get('phase')} after step {x.get('step', 0)} ({x.get('where')})"
            rest.setdefault(where, []).append(r)
    for where, ranks in rest.items():
        parts.append(f"{_ranks(ranks, identities, name_hosts=False)} waited {where}")
    return (f"no progress for {quiet:.0f} s (limit {limit:.0f} s: guard.stall_seconds plus the "
            f"longest step): {'; '.join(parts)}. Check the named ranks' nodes (a stopped "
            "process, a hung file system, a FIFO or unreachable file among the data); rerunning "
            "resumes from the last checkpoint")


def _ranks(ranks: List[int], identities: Sequence[Tuple[str, int]], name_hosts: bool = True) -> str:
    def one(r: int) -> str:
        if not name_hosts or r >= len(identities):
            return str(r)
        host, pid = identities[r]
        return f"{r} ({host}, pid {pid})"
    shown = ", ".join(one(r) for r in ranks[:_SHOWN])
    more = f" and {len(ranks) - _SHOWN} more" if len(ranks) > _SHOWN else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}{more}"


def _steps(reports: Dict[int, dict], ranks: List[int]) -> str:
    values = sorted({reports[r].get("step", 0) for r in ranks})
    return "/".join(map(str, values))


def _with_timeout(fn, seconds: float):
    """``fn()``'s result, or None if it has not returned within ``seconds`` (a hung file
    system must not keep the watchdog from ending the rank)."""
    box: list = []

    def call():
        try:
            box.append(fn())
        except OSError:
            box.append(None)
    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    return box[0] if box else None
