"""The local scheduler's runner: the one process that runs a queue's jobs, one after another.

A runner holds ``runner.lock`` for its life and runs the pending jobs of its
:class:`~knl_train.studies.localqueue.Queue` in id order: ``bash SCRIPT`` in the submit directory,
in a session of its own, with the submitter's environment plus ``LOCAL_JOB_ID``, its output in
``local-<id>.out`` beside the script. A job submitted ``--after`` another waits for it to end in
any state (Slurm's afterany). When nothing is pending the runner exits.

A job with a ``--time`` limit gets what Slurm gives it at the limit: SIGTERM to its process group
(``knl-train train`` checkpoints and stops on it), then, :data:`KILL_WAIT_SECONDS` later (Slurm's
KillWait default), SIGKILL to whatever of the group is left; it ends in state ``timeout``.

``submit`` starts a runner detached (:func:`ensure_runner`): ``python -m
knl_train.studies.localrunner --queue DIR``. Tests call :func:`run_queue` in the foreground.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from knl_train.studies import walltime
from knl_train.studies.localqueue import Queue, now, proc_start, queue_dir, signal_group

MODULE = "knl_train.studies.localrunner"
POLL_SECONDS = 1.0
KILL_WAIT_SECONDS = 30.0
_SAY = functools.partial(print, flush=True)  # the runner's log, read while it runs


def run_queue(queue: Queue, *, poll: float = POLL_SECONDS, sleep=time.sleep,
              grace: float = KILL_WAIT_SECONDS, echo=None) -> List[int]:
    """Run pending jobs until none is left, if no other runner holds the queue; the ids run.

    ``grace``: seconds between SIGTERM and SIGKILL for a job at its time limit.
    """
    echo = echo or _SAY
    queue.prepare()
    lock = queue.try_runner_lock()
    if lock is None:
        return []
    me = (os.getpid(), proc_start(os.getpid()) or "")
    ran: List[int] = []
    try:
        while True:
            what, job = queue.claim_next(me)
            if what == "run":
                ran.append(job["id"])
                run_job(queue, job, grace=grace, echo=echo)
            elif what == "wait":
                sleep(poll)
            else:
                # A submit that found this lock held left its job to us: let go of the lock,
                # then look again. A job queued before the release is seen here; one queued
                # after it finds the lock free and starts a runner itself.
                os.close(lock)
                lock = None
                if not queue.has_pending():
                    return ran
                lock = queue.try_runner_lock()
                if lock is None:
                    return ran  # another runner took over and will see it
    finally:
        if lock is not None:
            os.close(lock)


def run_job(queue: Queue, job: dict, *, grace: float = KILL_WAIT_SECONDS, echo=None) -> dict:
    """Run one claimed job (with its environment) to its end and record how it ended."""
    echo = echo or _SAY
    env = {**job["env"], "LOCAL_JOB_ID": str(job["id"])}
    limit = job.get("time_limit")  # absent from records of older versions
    echo(f"{now()} job {job['id']}: bash {job['script']} in {job['cwd']}"
         + (f", time limit {walltime.hms(limit, 2)}" if limit else ""))
    try:
        with open(job["output"], "ab") as out:
            proc = subprocess.Popen(["bash", job["script"]], cwd=job["cwd"], env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    except OSError as e:
        return queue.update(job["id"], state="failed", exit_code=127, end=now(),
                            reason=f"could not start: {e.strerror or e}")
    with queue.locked():
        job = queue.save({**queue.load(job["id"]), "pid": proc.pid, "pid_start": proc_start(proc.pid)})
    if job["cancel_requested"]:  # cancelled between the claim and now
        signal_group(proc.pid, signal.SIGTERM)
    say = functools.partial(_tell, echo, job["id"])
    rc, timed_out = wait_limited(proc, limit, grace, say=say)
    code = 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128+N
    with queue.locked():
        job = queue.load(job["id"])
        state, reason = ending(job, code, timed_out)
        job = queue.save({**job, "state": state, "exit_code": code, "end": now(), "reason": reason})
    echo(f"{now()} job {job['id']}: {state} (exit {code})")
    return job


def _tell(echo, job_id: int, text: str) -> None:
    echo(f"{now()} job {job_id}: {text}")


def ending(job: dict, code: int, timed_out: bool) -> Tuple[str, str]:
    """(state, reason) of a job that ended with ``code``: a cancel asked for wins over the limit."""
    if job["cancel_requested"]:
        return "cancelled", "cancelled while it ran"
    if timed_out:
        return "timeout", f"reached its time limit ({walltime.hms(job['time_limit'], 2)})"
    return ("completed", "") if code == 0 else ("failed", "")


def wait_limited(proc: subprocess.Popen, limit: Optional[float], grace: float, *,
                 say: Optional[Callable[[str], None]] = None, poll: float = 0.1,
                 sleep=time.sleep, clock=time.monotonic) -> Tuple[int, bool]:
    """Wait for a job (the leader of its process group): its return code, and whether it reached
    ``limit`` seconds. At the limit the whole group gets SIGTERM, and SIGKILL ``grace`` seconds
    later if any of it is left: the script may be gone while its ranks still write a checkpoint,
    and the next job must not start beside them."""
    try:
        return proc.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        pass
    deadline = clock() + grace
    signal_group(proc.pid, signal.SIGTERM)
    if say:
        say(f"time limit reached: SIGTERM to its processes, SIGKILL in {grace:g} s if any is left")
    try:
        rc: Optional[int] = proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        rc = None
    while rc is not None and clock() < deadline and signal_group(proc.pid, 0):
        sleep(poll)
    if signal_group(proc.pid, signal.SIGKILL) and say:
        say("SIGKILL to what was left of it")
    return (proc.wait() if rc is None else rc), True


def ensure_runner(queue: Queue) -> bool:
    """Start a detached runner unless one holds the queue (that one sees the new job)."""
    lock = queue.try_runner_lock()
    if lock is None:
        return False
    os.close(lock)  # the new runner takes it; if another submit's runner wins, it runs our job too
    spawn_runner(queue)
    return True


def spawn_runner(queue: Queue) -> subprocess.Popen:
    """The runner in a session of its own, attached to nothing the submitter has: a submit run
    with captured output returns at once, and a closed terminal does not stop the jobs."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # this knl_train, wherever it is imported from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(queue.path / "runner.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", MODULE, "--queue", str(queue.path)],
                                cwd=queue.path, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="Run a local job "
                                     "queue until nothing is pending (what submit starts, detached).")
    parser.add_argument("--queue", type=Path, help="the queue directory (default: this user's)")
    args = parser.parse_args(argv)
    run_queue(Queue(args.queue or queue_dir()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
