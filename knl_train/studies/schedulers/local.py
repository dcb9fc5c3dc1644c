"""The ``local`` backend: a study's points run on this node, one after another, detached.

The machinery is a tiny batch system of its own: a per-user queue of job records
(:mod:`knl_train.studies.localqueue`) and one detached runner per queue
(:mod:`knl_train.studies.localrunner`). This module is the :class:`~.Scheduler` interface over
them: ``submit`` enqueues a job and makes sure a runner is running, then returns; ``find`` matches
a job's ``#LOCAL --job-name`` and ``--comment``; ``status`` reads the records; ``check`` reads a
script's ``#LOCAL`` directives (``--job-name``, ``--comment``, ``--time``) as the queue will.

The module is also a small command line for users::

    python -m knl_train.studies.schedulers.local list             # the queue, as a table
    python -m knl_train.studies.schedulers.local cancel ID...     # pending: dropped; running: SIGTERM
    python -m knl_train.studies.schedulers.local submit SCRIPT [--after ID]
    python -m knl_train.studies.schedulers.local run              # work the queue in the foreground
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from knl_train.errors import UserError
from knl_train.studies import walltime
from knl_train.studies.localqueue import (DIRECTIVE, OPTIONS, Queue, alive, directives, options,
                                          queue_dir, read_json, time_limit)
from knl_train.studies.localrunner import ensure_runner, run_queue

from . import (COMMAND_TIMEOUT, Env, JobState, LookupFailed, Scheduler, check_directives_first, check_foreign_directives,
               check_shebang, command_program, directive_lines, is_command, logical_lines, split_words)

MODULE = "knl_train.studies.schedulers.local"
_SUBMITTED = re.compile(r"^Submitted local job (\d+)\s*$")


# ---- status ---------------------------------------------------------------------------------------
def job_state(job: Optional[dict]) -> JobState:
    """A job record in the scheduler-neutral terms of :class:`JobState`."""
    if job is None:
        return JobState("unknown", reason="not in the local queue", source="local")
    state, runner = job["state"], job["runner_pid"]
    if state == "pending":
        reason = f"waiting for job {job['after']}" if job["after"] is not None else "queued"
        return JobState("pending", reason=reason, source="local")
    if state == "running" and alive(runner, job["runner_start"]):
        return JobState("running", reason=f"pid {job['pid']}, since {job['start']}", source="local")
    if state == "running" and alive(job["pid"], job["pid_start"]):
        return JobState("running", reason=f"its runner (pid {runner}) died; the job still runs", source="local")
    if state in ("running", "lost"):
        return _orphan_end(job, f"its runner (pid {runner}) died while it ran")
    # completed, failed, timeout, cancelled: the same words in both vocabularies.
    reason = job["reason"] or f"ended {job['end']}"
    return JobState(state, exit_code=job["exit_code"], reason=reason, source="local")


def _orphan_end(job: dict, died: str) -> JobState:
    """A job whose runner died, its process gone too: how it ended, from the record a rendered
    script keeps beside itself (job-<id>.json). Unknown without one (or without a pid)."""
    rec = read_json(Path(job["script"]).parent / f"job-{job['id']}.json") if job["pid"] else None
    if not isinstance(rec, dict) or rec.get("state") not in ("started", "finished"):
        return JobState("unknown", reason=f"{died}; the job's own record tells how it ended", source="local")
    code = rec.get("exit_code") if rec["state"] == "finished" else None
    if not isinstance(code, int) or isinstance(code, bool):
        return JobState("failed", reason=f"{died}, and was killed before it recorded its end", source="local")
    return JobState("completed" if code == 0 else "failed", exit_code=code, source="local",
                    reason=f"{died}; ended {rec.get('end')} (its own record)")


# ---- the checker ----------------------------------------------------------------------------------
def check_rules(text: str) -> List[str]:
    problems = check_shebang(text)
    problems += check_foreign_directives(text, ("#SBATCH", "#PBS", "#BSUB"),
                                         "the local runner has no batch scheduler to obey it")
    problems += check_directives_first(text, DIRECTIVE, "the local runner")
    for n, words in directive_lines(text, DIRECTIVE):
        for name, value in options(words):
            if name not in OPTIONS:
                problems.append(f"[local-option] line {n}: unknown {DIRECTIVE} option --{name}; "
                                f"known: {', '.join('--' + o for o in OPTIONS)}")
            elif value is None:
                problems.append(f"[local-option] line {n}: --{name} needs a value (--{name}=VALUE)")
            elif name == "time":
                problems += _time_problem(n, value)
    if "job-name" not in directives(text):
        problems.append(f"[job-name] no {DIRECTIVE} --job-name: name the job (the study finds it "
                        "again by name)")
    for n, line in logical_lines(text):
        program = command_program(split_words(line))[0] if is_command(line) else None
        if program in ("srun", "ibrun", "aprun"):
            problems.append(f"[no-{program}] line {n}: {program} needs a batch allocation, and a "
                            "local job has none: launch the ranks with knl-train launch")
    return problems


def _time_problem(n: int, value: str) -> List[str]:
    """A --time the queue would refuse (submit reads it with the same function)."""
    try:
        time_limit(value)
    except UserError as e:
        return [f"[local-time] line {n}: {e}"]
    return []


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

    def find(self, job_name: str, token: str, env: Env = None, *, workdir: Optional[Path] = None,
             exclude: Sequence[str] = ()) -> Optional[str]:
        # The first one: a second submit of the same point is the duplicate.
        try:
            jobs = Queue(queue_dir(env)).jobs()
        except (OSError, UserError) as e:
            raise LookupFailed(f"the local queue could not be read ({e})") from None
        return next((str(j["id"]) for j in jobs if j["token"] == token and j["name"] == job_name
                     and str(j["id"]) not in exclude), None)

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
    header = ("id", "state", "exit", "submitted", "limit", "name", "script")
    rows = [(str(j["id"]), j["state"] + ("*" if j["cancel_requested"] and j["state"] == "running" else ""),
             "" if j["exit_code"] is None else str(j["exit_code"]), j["submitted"],
             walltime.hms(j["time_limit"], 2) if j.get("time_limit") else "-", j["name"], j["script"])
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
    r = sub.add_parser("run", help="run the queue in the foreground (what submit starts, detached)")
    r.add_argument("--queue", type=Path, help="the queue directory (default: this user's)")
    args = parser.parse_args(argv)
    queue = Queue(getattr(args, "queue", None) or queue_dir())
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
