"""The ``local`` backend: a study's points run on this node, one after another, detached.

A per-user queue directory, ``$XDG_STATE_HOME/knl-train/local-queue`` (by default
``~/.local/state/knl-train/local-queue``, mode 0700: job records hold the submitter's
environment), keeps one JSON record per job (``jobs/<id>.json``, written atomically), the id
counter (``next-id``), two lock files and the runner's log (``runner.log``).

``submit`` enqueues a job and makes sure a runner is running, then returns. The runner, one per
queue (it holds ``runner.lock`` for its life), runs the pending jobs in id order, one at a time:
``bash SCRIPT`` in the submit directory, in a session of its own, with the submitter's
environment (as ``sbatch --export=ALL``) plus ``LOCAL_JOB_ID``, its output in ``local-<id>.out``
beside the script. A job submitted ``--after`` another waits for it to end in any state (Slurm's
afterany). When nothing is pending the runner exits. Jobs are claimed under ``queue.lock``, so
none runs twice.

Scripts name themselves as sbatch scripts do, in directive lines before the first command:
``#LOCAL --job-name=NAME`` and ``#LOCAL --comment=TOKEN`` (the token :meth:`Local.find` matches).

The module is also a small command line for users::

    python -m knl_train.studies.schedulers.local list             # the queue, as a table
    python -m knl_train.studies.schedulers.local cancel ID...     # pending: dropped; running: SIGTERM
    python -m knl_train.studies.schedulers.local submit SCRIPT [--after ID]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from knl_train.atomic import write_json_atomic, write_text_atomic
from knl_train.errors import UserError

from . import (COMMAND_TIMEOUT, Env, JobState, Scheduler, check_directives_first, check_foreign_directives,
               check_shebang, command_program, directive_lines, first_command_line, is_command,
               logical_lines, split_words)

MODULE = "knl_train.studies.schedulers.local"
DIRECTIVE = "#LOCAL"
OPTIONS = ("job-name", "comment")
# "lost": it was running when its runner died; the job's own record tells how it ended.
ENDED = frozenset({"completed", "failed", "cancelled", "lost"})
POLL_SECONDS = 1.0
_SUBMITTED = re.compile(r"^Submitted local job (\d+)\s*$")


def queue_dir(environ: Env = None) -> Path:
    """The queue of the user whose environment this is (relative XDG paths are ignored, per the spec)."""
    environ = os.environ if environ is None else environ
    state = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):
        home = environ.get("HOME") or str(Path.home())
        state = os.path.join(home, ".local", "state")
    return Path(state) / "knl-train" / "local-queue"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def directives(text: str) -> Dict[str, str]:
    """The ``#LOCAL --name=value`` options before the first command (later ones are ignored)."""
    out: Dict[str, str] = {}
    first = first_command_line(text)
    for n, words in directive_lines(text, DIRECTIVE):
        if first is not None and n > first:
            break
        for name, value in _options(words):
            if value is not None:
                out[name] = value
    return out


def _options(words: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    out, i = [], 0
    while i < len(words):
        name, eq, value = words[i].lstrip("-").partition("=")
        i += 1
        if not eq and i < len(words) and not words[i].startswith("-"):
            value, i = words[i], i + 1
        out.append((name, value if (eq or value) else None))
    return out


# ---- the queue ----------------------------------------------------------------------------------
class Queue:
    """A queue directory: job records, the id counter and the locks."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.jobs_dir = self.path / "jobs"

    def prepare(self) -> "Queue":
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            self.path.chmod(0o700)
        except OSError as e:
            raise UserError(f"cannot create the local job queue {self.path}: {e.strerror or e}; "
                            "set XDG_STATE_HOME to a directory you can write") from None
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while records change state, so a job is claimed once and ids are unique."""
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
        write_json_atomic(self.jobs_dir / f"{job['id']}.json", job)
        return job

    def jobs(self) -> List[dict]:
        found = (read_json(p) for p in self.jobs_dir.glob("*.json") if p.stem.isdigit())
        return sorted((j for j in found if j is not None), key=lambda j: j["id"])

    def update(self, job_id, **changes) -> dict:
        with self.locked():
            return self.save({**self.load(job_id), **changes})

    def enqueue(self, script, *, cwd: Path, env: Mapping[str, str], after=None) -> int:
        """Queue ``script`` (relative to ``cwd``); its job id. UserError: no such script or job."""
        script = (Path(cwd) / script).resolve()
        try:
            text = script.read_text(errors="replace")
        except OSError as e:
            raise UserError(f"cannot read the job script {script}: {e.strerror or e}") from None
        opts = directives(text)
        self.prepare()
        with self.locked():
            if after is not None and self.load(after) is None:
                raise UserError(f"job {after} is not in the local queue {self.path}: "
                                "a job cannot wait for it")
            job_id = self._next_id()
            self.save({
                "id": job_id, "name": opts.get("job-name", script.name),
                "token": opts.get("comment"), "script": str(script), "cwd": str(Path(cwd).resolve()),
                "after": None if after is None else int(after), "state": "pending", "exit_code": None,
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

    def claim_next(self, me: Tuple[int, str]) -> Tuple[str, Optional[dict]]:
        """("run", job) claimed for runner ``me``; ("wait", None) while a job left by a dead
        runner still runs (one job at a time); ("idle", None) when nothing is pending."""
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
                    j.update(state="running", start=now(), runner_pid=me[0], runner_start=me[1])
                    return "run", self.save(j)
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
            if job["state"] == "pending" or not (running or alive(job["runner_pid"], job["runner_start"])):
                reason = "cancelled before it started" if job["state"] == "pending" else \
                    "cancelled after its runner died"
                self.save({**job, "state": "cancelled", "end": now(), "reason": reason})
                return "cancelled"
            self.save({**job, "cancel_requested": True})
        # Running: its runner records "cancelled" when it ends (and kills one it is starting).
        if not running:
            return "cancel requested (it is starting)"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job["pid"], signal.SIGTERM)
        return "signalled (SIGTERM)"


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- the runner ---------------------------------------------------------------------------------
def run_queue(queue: Queue, *, poll: float = POLL_SECONDS, sleep=time.sleep,
              echo=None) -> List[int]:
    """Run pending jobs until none is left, if no other runner holds the queue; the ids run.

    The runner's detached process calls this; tests call it in the foreground.
    """
    echo = echo or _say
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
                run_job(queue, job, echo=echo)
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


def run_job(queue: Queue, job: dict, *, echo=None) -> dict:
    """Run one claimed job to its end and record how it ended."""
    echo = echo or _say
    env = {**job["env"], "LOCAL_JOB_ID": str(job["id"])}
    echo(f"{now()} job {job['id']}: bash {job['script']} in {job['cwd']}")
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    rc = proc.wait()
    code = 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128+N
    with queue.locked():
        job = queue.load(job["id"])
        state = "cancelled" if job["cancel_requested"] else "completed" if code == 0 else "failed"
        job = queue.save({**job, "state": state, "exit_code": code, "end": now(),
                          "reason": "cancelled while it ran" if state == "cancelled" else ""})
    echo(f"{now()} job {job['id']}: {state} (exit {code})")
    return job


def _say(line: str) -> None:
    print(line, flush=True)  # the runner's log, read while it runs


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
    root = str(Path(__file__).resolve().parents[3])  # this knl_train, wherever it is imported from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(queue.path / "runner.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", MODULE, "run"], cwd=queue.path, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)


# ---- status ---------------------------------------------------------------------------------------
def job_state(job: Optional[dict]) -> JobState:
    """A job record in the scheduler-neutral terms of :class:`JobState`."""
    if job is None:
        return JobState("unknown", reason="not in the local queue", source="local")
    state, runner = job["state"], job["runner_pid"]
    if state == "pending":
        reason = f"waiting for job {job['after']}" if job["after"] is not None else "queued"
        return JobState("pending", reason=reason, source="local")
    if state == "running":
        if alive(runner, job["runner_start"]):
            return JobState("running", reason=f"pid {job['pid']}, since {job['start']}", source="local")
        if alive(job["pid"], job["pid_start"]):
            return JobState("running", reason=f"its runner (pid {runner}) died; the job still runs",
                            source="local")
        return JobState("unknown", source="local", reason=f"its runner (pid {runner}) died while it "
                        "ran; the job's own record tells how it ended")
    if state == "lost":
        return JobState("unknown", reason=job["reason"], source="local")
    reason = job["reason"] or f"ended {job['end']}"
    return JobState(state, exit_code=job["exit_code"], reason=reason, source="local")


def check_rules(text: str) -> List[str]:
    problems = check_shebang(text)
    problems += check_foreign_directives(text, ("#SBATCH", "#PBS", "#BSUB"),
                                         "the local runner has no batch scheduler to obey it")
    problems += check_directives_first(text, DIRECTIVE, "the local runner")
    for n, words in directive_lines(text, DIRECTIVE):
        for name, value in _options(words):
            if name not in OPTIONS:
                problems.append(f"[local-option] line {n}: unknown {DIRECTIVE} option --{name}; "
                                f"known: {', '.join('--' + o for o in OPTIONS)}")
            elif value is None:
                problems.append(f"[local-option] line {n}: --{name} needs a value (--{name}=VALUE)")
    if "job-name" not in directives(text):
        problems.append(f"[job-name] no {DIRECTIVE} --job-name: name the job (the study finds it "
                        "again by name)")
    for n, line in logical_lines(text):
        program = command_program(split_words(line))[0] if is_command(line) else None
        if program in ("srun", "ibrun", "aprun"):
            problems.append(f"[no-{program}] line {n}: {program} needs a batch allocation, and a "
                            "local job has none: launch the ranks with knl-train launch")
    return problems


class Local(Scheduler, name="local", script_name="job.sh", directive=DIRECTIVE,
            submit_command=f"python -m {MODULE} submit", status_command=f"python -m {MODULE} list"):
    """This node as a one-job-at-a-time scheduler; see the module docstring."""

    def __init__(self, timeout: float = COMMAND_TIMEOUT, revive: bool = True):
        super().__init__(timeout)
        # status() restarts a dead runner (a reboot, a kill) when jobs wait for one.
        self.revive = revive

    def submit_argv(self, script: Path, after: Optional[str]) -> List[str]:
        return [sys.executable, "-m", MODULE, "submit", str(script),
                *(["--after", str(after)] if after else [])]

    def parse_job_id(self, stdout: str) -> Optional[str]:
        found = [m.group(1) for m in map(_SUBMITTED.match, stdout.splitlines()) if m]
        return found[-1] if found else None

    def find(self, job_name: str, token: str, env: Env = None) -> Optional[str]:
        # The first one: a second submit of the same point is the duplicate.
        jobs = Queue(queue_dir(env)).jobs()
        return next((str(j["id"]) for j in jobs if j["token"] == token and j["name"] == job_name), None)

    def status(self, job_ids: Sequence[str], env: Env = None) -> Dict[str, JobState]:
        queue = Queue(queue_dir(env))
        out = {}
        for i in dict.fromkeys(str(i) for i in job_ids):
            out[i] = job_state(queue.load(i) if i.isdigit() else None)
        if self.revive and any(s.state == "pending" for s in out.values()) and queue.path.is_dir():
            with contextlib.suppress(OSError):
                ensure_runner(queue)
        return out

    def check(self, text: str) -> List[str]:
        return check_rules(text)


# ---- command line -------------------------------------------------------------------------------
def list_text(jobs: List[dict]) -> str:
    header = ("id", "state", "exit", "submitted", "name", "script")
    rows = [(str(j["id"]), j["state"] + ("*" if j["cancel_requested"] and j["state"] == "running" else ""),
             "" if j["exit_code"] is None else str(j["exit_code"]), j["submitted"], j["name"], j["script"])
            for j in jobs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="The local scheduler: "
                                     "job scripts run on this node, one after another, detached.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="queue a job script; print its id")
    s.add_argument("script")
    s.add_argument("--after", type=int, help="start only after this job has ended (in any state)")
    c = sub.add_parser("cancel", help="cancel jobs: pending ones never start, running ones get SIGTERM")
    c.add_argument("ids", nargs="+", type=int)
    sub.add_parser("list", help="the queue, as a table")
    sub.add_parser("run", help="run the queue in the foreground (what submit starts, detached)")
    args = parser.parse_args(argv)
    queue = Queue(queue_dir())
    try:
        if args.command == "submit":
            job_id = queue.enqueue(args.script, cwd=Path.cwd(), env=os.environ, after=args.after)
            print(f"Submitted local job {job_id}", flush=True)
            try:
                ensure_runner(queue)
            except OSError as e:  # queued all the same: the next submit or status starts a runner
                print(f"warning: could not start the local runner: {e}", file=sys.stderr)
        elif args.command == "cancel":
            said = {i: queue.cancel(i) for i in args.ids}
            for i, what in said.items():
                print(f"job {i}: {what}")
            return 1 if "unknown" in said.values() else 0
        elif args.command == "list":
            print(list_text(queue.jobs()) if queue.path.is_dir() else f"no jobs in {queue.path}")
        else:
            run_queue(queue)
    except UserError as e:
        print(f"local {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
