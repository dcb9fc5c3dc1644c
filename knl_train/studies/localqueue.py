"""The local scheduler's queue: a per-user directory of job records, an id counter and two locks.

``$XDG_STATE_HOME/knl-train/local-queue`` (by default ``~/.local/state/knl-train/local-queue``)::

    jobs/<id>.json   one record per job, written atomically
    next-id          the id counter (ids are never reused while a record is here)
    queue.lock       held while records change state: a job is claimed once, ids are unique
    runner.lock      held by the one runner working the queue (:mod:`~knl_train.studies.localrunner`)
    runner.log       the runner's log

A pending job's record holds the submitter's environment (what the job runs with, as
``sbatch --export=ALL``), so the directories are 0700 and the records 0600, and a record drops
the environment once the job has started or been cancelled. Jobs that ended more than
:data:`KEEP_DAYS` days ago are forgotten at the next submit.

A record's ``state``: pending, running, then completed, failed, timeout (its ``--time`` limit
reached), cancelled, or lost (it was running when its runner died; the job's own record tells how
it ended). Scripts name themselves as sbatch scripts do, in directive lines before the first
command: ``#LOCAL --job-name=NAME``, ``#LOCAL --comment=TOKEN`` and ``#LOCAL --time=HH:MM:SS``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import socket
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from knl_train.atomic import write_json_atomic, write_text_atomic
from knl_train.errors import UserError
from knl_train.studies import walltime
from knl_train.studies.schedulers import Env, directive_lines, first_command_line

DIRECTIVE = "#LOCAL"
OPTIONS = ("job-name", "comment", "time")
ENDED = frozenset({"completed", "failed", "timeout", "cancelled", "lost"})
KEEP_DAYS = 30
RECORD_MODE = 0o600
_STAMP = "%Y-%m-%dT%H:%M:%SZ"


def queue_dir(environ: Env = None) -> Path:
    """The queue of the user whose environment this is (relative XDG paths are ignored, per the spec)."""
    environ = os.environ if environ is None else environ
    state = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):
        home = environ.get("HOME") or str(Path.home())
        state = os.path.join(home, ".local", "state")
    return Path(state) / "knl-train" / "local-queue"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime(_STAMP)


# ---- processes: a pid alone may have been reused, so a process is its pid and its start time -------
def proc_start(pid: Optional[int]) -> Optional[str]:
    """The start time of a live process (from /proc), or None if there is none (or a zombie)."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if os.path.exists("/proc/self/stat"):
            return None
        try:  # no /proc (not Linux): the pid alone, reuse undetected
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    # After the command: field 3 (state) is fields[0], field 22 (starttime) is fields[19].
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def alive(pid: Optional[int], start: Optional[str]) -> bool:
    return bool(pid) and start is not None and proc_start(pid) == start


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to a job's process group; False if none of it is left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


# ---- directives ---------------------------------------------------------------------------------
def directives(text: str) -> Dict[str, str]:
    """The ``#LOCAL --name=value`` options before the first command (later ones are ignored)."""
    out: Dict[str, str] = {}
    first = first_command_line(text)
    for n, words in directive_lines(text, DIRECTIVE):
        if first is not None and n > first:
            break
        for name, value in options(words):
            if value is not None:
                out[name] = value
    return out


def options(words: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """(name, value or None) of each ``--name=value`` or ``--name value`` in a directive line."""
    out, i = [], 0
    while i < len(words):
        name, eq, value = words[i].lstrip("-").partition("=")
        i += 1
        if not eq and i < len(words) and not words[i].startswith("-"):
            value, i = words[i], i + 1
        out.append((name, value if (eq or value) else None))
    return out


def time_limit(value: str) -> int:
    """Seconds from a ``--time`` value, read as Slurm reads it; UserError if it is not one, or zero."""
    text = value.strip()
    if not walltime.valid_slurm(text):
        raise UserError(f"--time={value} is not a time limit: write HH:MM:SS (or MM, MM:SS, D-HH, "
                        "D-HH:MM, D-HH:MM:SS)")
    try:
        minutes = int(text) if text.isdigit() else walltime.minutes(text, {})  # a lone number: minutes
    except UserError:
        minutes = 0  # a valid Slurm time that walltime refuses is zero: said below, as --time
    seconds = round(minutes * 60)
    if seconds <= 0:
        raise UserError(f"--time={value} is zero: give a limit above zero (or no --time for none)")
    return seconds


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ended_at(job: dict) -> Optional[dt.datetime]:
    try:
        return dt.datetime.strptime(job["end"], _STAMP).replace(tzinfo=dt.timezone.utc)
    except (KeyError, TypeError, ValueError):
        return None


# ---- the queue ----------------------------------------------------------------------------------
class Queue:
    """A queue directory: job records, the id counter and the locks."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.jobs_dir = self.path / "jobs"

    def prepare(self) -> "Queue":
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            for d in (self.path, self.jobs_dir):
                d.chmod(0o700)
        except OSError as e:
            raise UserError(f"cannot create the local job queue {self.path}: {e.strerror or e}; "
                            "set XDG_STATE_HOME to a directory you can write") from None
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while records change state, so a job is claimed once and ids are unique.
        Not reentrant: flock on a second descriptor would wait for this process's own lock."""
        fd = os.open(self.path / "queue.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def try_runner_lock(self) -> Optional[int]:
        """The runner lock's fd if nobody holds it, else None (a runner is working the queue)."""
        fd = os.open(self.path / "runner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def load(self, job_id) -> Optional[dict]:
        try:
            return read_json(self.jobs_dir / f"{int(job_id)}.json")
        except ValueError:
            return None

    def save(self, job: dict) -> dict:
        write_json_atomic(self.jobs_dir / f"{job['id']}.json", job, mode=RECORD_MODE)
        return job

    def jobs(self) -> List[dict]:
        found = (read_json(p) for p in self.jobs_dir.glob("*.json") if p.stem.isdigit())
        return sorted((j for j in found if j is not None), key=lambda j: j["id"])

    def update(self, job_id, **changes) -> dict:
        with self.locked():
            return self.save({**self.load(job_id), **changes})

    def enqueue(self, script, *, cwd: Path, env: Mapping[str, str], after=None) -> int:
        """Queue ``script`` (relative to ``cwd``); its job id. UserError: no such script or job,
        or a ``--time`` that is not a time limit."""
        script = (Path(cwd) / script).resolve()
        try:
            text = script.read_text(errors="replace")
        except OSError as e:
            raise UserError(f"cannot read the job script {script}: {e.strerror or e}") from None
        opts = directives(text)
        try:
            limit = time_limit(opts["time"]) if "time" in opts else None
        except UserError as e:
            raise UserError(f"{script}: {e}") from None
        self.prepare().prune()
        with self.locked():
            if after is not None and self.load(after) is None:
                raise UserError(f"job {after} is not in the local queue {self.path}: "
                                "a job cannot wait for it")
            job_id = self._next_id()
            self.save({
                "id": job_id, "name": opts.get("job-name", script.name),
                "token": opts.get("comment"), "script": str(script), "cwd": str(Path(cwd).resolve()),
                "after": None if after is None else int(after), "time_limit": limit,
                "state": "pending", "exit_code": None,
                "submitted": now(), "start": None, "end": None, "host": socket.gethostname(),
                "runner_pid": None, "runner_start": None, "pid": None, "pid_start": None,
                "cancel_requested": False, "reason": "",
                "output": str(script.parent / f"local-{job_id}.out"),
                "env": {k: v for k, v in env.items() if k != "LOCAL_JOB_ID"}})
        return job_id

    def _next_id(self) -> int:
        counter = self.path / "next-id"
        try:
            stored = int(counter.read_text().strip())
        except (OSError, ValueError):
            stored = 1
        # Never reuse an id whose record is still here, even if the counter was lost.
        job_id = max([stored, *(int(p.stem) + 1 for p in self.jobs_dir.glob("*.json") if p.stem.isdigit())])
        write_text_atomic(counter, f"{job_id + 1}\n")
        return job_id

    def prune(self, keep_days: float = KEEP_DAYS) -> List[int]:
        """Forget the jobs that ended more than ``keep_days`` ago; the ids forgotten. The other
        ended jobs' records lose any environment left in them (records of older runners)."""
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=keep_days)
        gone = []
        with self.locked():
            for job in self.jobs():
                if job["state"] not in ENDED:
                    continue
                ended = _ended_at(job)
                if ended is not None and ended < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        (self.jobs_dir / f"{job['id']}.json").unlink()
                    gone.append(job["id"])
                elif "env" in job:
                    self.save({k: v for k, v in job.items() if k != "env"})
        return gone

    def claim_next(self, me: Tuple[int, str]) -> Tuple[str, Optional[dict]]:
        """("run", job) claimed for runner ``me`` (the job with its environment, which its record
        no longer keeps); ("wait", None) while a job left by a dead runner still runs (one job at
        a time); ("idle", None) when nothing is pending."""
        with self.locked():
            jobs = self.jobs()
            by_id = {j["id"]: j for j in jobs}
            for j in jobs:
                if j["state"] == "running" and (j["runner_pid"], j["runner_start"]) != me:
                    # Only the runner lock's holder claims jobs: this job's runner is dead.
                    if alive(j["pid"], j["pid_start"]):
                        return "wait", None
                    j.update(state="lost", end=now(), reason=f"its runner (pid {j['runner_pid']}) "
                             "died while it ran; the job's own record tells how it ended")
                    self.save(j)
            for j in jobs:
                after = by_id.get(j["after"]) if j["after"] is not None else None
                if j["state"] == "pending" and (after is None or after["state"] in ENDED
                                                or after["id"] >= j["id"]):
                    env = j.pop("env", None) or {}
                    j.update(state="running", start=now(), runner_pid=me[0], runner_start=me[1])
                    return "run", {**self.save(j), "env": env}
            return "idle", None

    def has_pending(self) -> bool:
        with self.locked():
            return any(j["state"] == "pending" for j in self.jobs())

    def cancel(self, job_id) -> str:
        """Cancel one job: what happened, in a few words."""
        with self.locked():
            job = self.load(job_id)
            if job is None:
                return "unknown"
            if job["state"] in ENDED:
                return f"already {job['state']}"
            running = alive(job["pid"], job["pid_start"])
            runner = alive(job["runner_pid"], job["runner_start"])
            if job["pid"] and not running and runner:  # it ended; its runner records how, not "cancelled"
                return "already ended"
            if job["state"] == "pending" or not (running or runner):
                reason = "cancelled " + ("before it started" if job["state"] == "pending"
                                         else "after its runner died")
                job = {k: v for k, v in job.items() if k != "env"}
                self.save({**job, "state": "cancelled", "end": now(), "reason": reason})
                return "cancelled"
            self.save({**job, "cancel_requested": True})
        # Running: its runner records "cancelled" when it ends (and kills one it is starting).
        if not running:
            return "cancel requested (it is starting)"
        signal_group(job["pid"], signal.SIGTERM)
        return "signalled (SIGTERM)"
