"""Slurm backend: sbatch to submit, squeue (then sacct, if accounting works) to track."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from knl_train.errors import UserError
from knl_train.studies import walltime

from . import (Env, JobState, LookupFailed, Scheduler, TransientError, check_directives_first,
               check_foreign_directives, check_shebang, command_program, directive_lines,
               logical_lines, is_command, split_words)

TRANSIENT_PATTERNS = (
    "Socket timed out on send/recv",
    "Unable to contact slurm controller",
    "Connection refused",
    "Resource temporarily unavailable",
    "slurm_receive_msg",
    "Zero Bytes were transmitted",
    "try again",
    # A per-user submit limit clears as our own jobs finish: waiting is the fix.
    "QOSMaxSubmitJobPerUserLimit",
)

STATE_MAP = {
    **dict.fromkeys(("PENDING", "CONFIGURING", "REQUEUED", "SUSPENDED", "RESIZING",
                     "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "STOPPED"), "pending"),
    **dict.fromkeys(("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"), "running"),
    "COMPLETED": "completed",
    **dict.fromkeys(("FAILED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "DEADLINE",
                     "SPECIAL_EXIT"), "failed"),
    "TIMEOUT": "timeout",
    **dict.fromkeys(("CANCELLED", "PREEMPTED", "REVOKED"), "cancelled"),
}

# What sacct says where accounting is off: it cannot help, and that is not a failure.
ACCOUNTING_OFF = "accounting storage is disabled"

# When array tasks end differently, the array reports the worst: a failure says the most.
SEVERITY = ("failed", "timeout", "cancelled", "completed")

_JOB_ID = re.compile(r"^\d+$")
_SHORT = {"N": "nodes", "n": "ntasks", "c": "cpus-per-task", "t": "time", "J": "job-name",
          "p": "partition", "A": "account", "q": "qos", "o": "output", "e": "error",
          "C": "constraint", "w": "nodelist", "x": "exclude", "d": "dependency", "a": "array",
          "D": "chdir", "G": "gpus", "m": "distribution", "i": "input", "M": "clusters",
          "L": "licenses", "S": "core-spec", "B": "extra-node-info"}


def map_state(raw: str) -> str:
    """Our state for a Slurm state string ("CANCELLED by 0" -> cancelled)."""
    word = raw.strip().split(" ", 1)[0].split(",", 1)[0].rstrip("+").upper()
    return STATE_MAP.get(word, "unknown")


def base_id(job_id: str) -> str:
    """The job a row belongs to: "123_4", "123_[0-3]" and "123+1" belong to "123"."""
    return re.split(r"[_+]", job_id, maxsplit=1)[0]


def parse_exit_code(text: str) -> Optional[int]:
    """sacct's ExitCode "1:0" (code:signal) -> 1."""
    head = text.strip().split(":", 1)[0]
    return int(head) if head.isdigit() else None


def aggregate(states: List[JobState]) -> JobState:
    """One state for an array job from its tasks' states."""
    if len(states) == 1:
        return states[0]
    for wanted in ("running", "pending"):
        for s in states:
            if s.state == wanted:
                return s
    if all(s.finished for s in states):
        return min(states, key=lambda s: SEVERITY.index(s.state))
    return next(s for s in states if not s.finished)


def parse_options(words: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """(long option name, value or None) for sbatch/srun-style option words."""
    out: List[Tuple[str, Optional[str]]] = []
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            if eq:
                out.append((name, value))
            elif i < len(words) and not words[i].startswith("-"):
                out.append((name, words[i]))
                i += 1
            else:
                out.append((name, None))
        elif w.startswith("-") and len(w) > 1:
            name = _SHORT.get(w[1], w[1])
            if w[1] not in _SHORT:
                out.append((name, None))
            elif len(w) > 2:
                out.append((name, w[2:].lstrip("=")))
            elif i < len(words):
                out.append((name, words[i]))
                i += 1
            else:
                out.append((name, None))
    return out


# -- checker rules: each takes the script text and returns messages --------------------------

def _sbatch_options(text: str) -> List[Tuple[int, str, Optional[str]]]:
    return [(n, name, value) for n, words in directive_lines(text, "#SBATCH")
            for name, value in parse_options(words)]


def rule_shebang(text: str) -> List[str]:
    return check_shebang(text)


def rule_no_pbs(text: str) -> List[str]:
    return check_foreign_directives(
        text, ("#PBS", "#BSUB"),
        "sbatch also obeys #PBS/#BSUB lines, so the two families never share a file")


def rule_directives_first(text: str) -> List[str]:
    return check_directives_first(text, "#SBATCH", "sbatch")


def rule_nodes_with_ntasks_per_node(text: str) -> List[str]:
    opts = _sbatch_options(text)
    if any(name == "nodes" for _, name, _ in opts):
        return []
    return [f"[nodes-with-ntasks-per-node] line {n}: --ntasks-per-node without --nodes is only a "
            f"per-node maximum (Slurm may spread the tasks): add #SBATCH --nodes"
            for n, name, _ in opts if name == "ntasks-per-node"]


def rule_no_sbatch_cpu_bind(text: str) -> List[str]:
    return [f"[cpu-bind-in-sbatch] line {n}: --cpu-bind is an srun option (sbatch rejects it): "
            f"pass it on the srun line" for n, name, _ in _sbatch_options(text)
            if name in ("cpu-bind", "cpu_bind")]


# srun options that take no value: everything else without "=" consumes the next word.
_SRUN_FLAGS = {"--unbuffered", "--label", "--exclusive", "--overlap", "--overcommit", "--quiet",
               "--verbose", "--kill-on-bad-exit", "--pty", "--exact", "--whole", "--no-kill",
               "--multi-prog", "--disable-status", "--test-only", "--spread-job",
               "--use-min-nodes", "--preserve-env", "--propagate", "--resv-ports", "--wait"}
_SRUN_SHORT_FLAGS = set("ulOQvKkXEHZsI")


def srun_options(args: Sequence[str]) -> List[str]:
    """The words before srun's program, so the program's own ``-c`` is not taken for srun's."""
    out: List[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-") or a == "-":
            break
        out.append(a)
        i += 1
        takes_value = (a not in _SRUN_FLAGS and "=" not in a) if a.startswith("--") else \
            (len(a) == 2 and a[1] not in _SRUN_SHORT_FLAGS)
        if takes_value and i < len(args):
            out.append(args[i])
            i += 1
    return out


def _srun_lines(text: str) -> List[Tuple[int, List[str]]]:
    out = []
    for n, line in logical_lines(text):
        if is_command(line):
            program, args = command_program(split_words(line))
            if program == "srun":
                out.append((n, srun_options(args)))
    return out


def rule_srun_cpus_per_task(text: str) -> List[str]:
    def has(args):
        return any(a.startswith("--cpus-per-task") or
                   (a.startswith("-c") and not a.startswith("--")) for a in args)
    return [f"[srun-cpus-per-task] line {n}: srun without --cpus-per-task; srun does not inherit "
            f"it from sbatch on Slurm 22.05-23.02, so pass it explicitly"
            for n, args in _srun_lines(text) if not has(args)]


def rule_srun_cpu_bind(text: str) -> List[str]:
    return [f"[srun-cpu-bind] line {n}: srun without --cpu-bind; pass an explicit binding "
            f"(e.g. --cpu-bind=cores)" for n, args in _srun_lines(text)
            if not any(a.startswith(("--cpu-bind", "--cpu_bind")) for a in args)]


def rule_time_format(text: str) -> List[str]:
    return [f"[time-format] line {n}: --time={value!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, "
            f"D-HH, D-HH:MM or D-HH:MM:SS)" for n, name, value in _sbatch_options(text)
            if name == "time" and not walltime.valid_slurm(value or "")]


def rule_job_name(text: str) -> List[str]:
    if any(name == "job-name" and value for _, name, value in _sbatch_options(text)):
        return []
    return ["[job-name] no #SBATCH --job-name: name the job (the study finds it again by name)"]


RULES = (rule_shebang, rule_no_pbs, rule_directives_first, rule_nodes_with_ntasks_per_node,
         rule_no_sbatch_cpu_bind, rule_srun_cpus_per_task, rule_srun_cpu_bind, rule_time_format,
         rule_job_name)


class Slurm(Scheduler, name="slurm", script_name="job.sbatch", directive="#SBATCH",
            submit_command="sbatch", status_command="squeue",
            transient_patterns=TRANSIENT_PATTERNS):
    """Slurm: ``sbatch --parsable``; tracking through squeue, sacct only where it works."""

    def submit_argv(self, script: Path, after: Optional[str]) -> List[str]:
        argv = ["sbatch", "--parsable"]
        if after:
            # afterany: the next point runs whether or not this one failed; scaling points
            # are independent, the chain only serialises them.
            argv.append(f"--dependency=afterany:{after}")
        return argv + [str(script)]

    def parse_job_id(self, stdout: str) -> Optional[str]:
        # --parsable: "<id>" or "<id>;<cluster>" on the last line.
        lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
        job_id = lines[-1].split(";", 1)[0].strip() if lines else ""
        return job_id if _JOB_ID.match(job_id) else None

    def find(self, job_name: str, token: str, env: Env = None, *, workdir: Optional[Path] = None,
             exclude: Sequence[str] = ()) -> Optional[str]:
        """squeue first (-t all: a job that ended within MinJobAge was submitted too), then sacct
        for one that has aged out of squeue. The comment carries the token; where sacct does not
        store comments (AccountingStoreFlags without job_comment), the point's directory
        (``workdir``) identifies the job instead."""
        proc = self._ask(["squeue", "-h", "-t", "all", f"--name={job_name}", "-o", "%i|%k|%Z"], env)
        found = _pick(proc.stdout, token, workdir, exclude)
        if found:
            return found
        return _pick(self._sacct_named(job_name, env), token, workdir, exclude)

    def _ask(self, argv: List[str], env: Env):
        """Run a lookup command; LookupFailed when it cannot answer."""
        try:
            proc = self.run(argv, env=env)
        except (TransientError, UserError) as e:
            raise LookupFailed(f"{argv[0]} could not be asked ({e})") from None
        if proc.returncode != 0:
            raise LookupFailed(f"{argv[0]} failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[:200] or '(no output)'}")
        return proc

    def _sacct_named(self, job_name: str, env: Env) -> str:
        """sacct's rows (JobID|Comment|WorkDir) for the job name over the last year; empty where
        accounting is off or sacct is not installed (squeue was all there is)."""
        argv = ["sacct", "-n", "-P", "-X", f"--name={job_name}", "-S", "now-366days", "-E", "now",
                "-o", "JobID,Comment,WorkDir"]
        try:
            proc = self.run(argv, env=env)
        except UserError:
            return ""
        except TransientError as e:
            raise LookupFailed(f"sacct could not be asked ({e})") from None
        if proc.returncode != 0:
            text = (proc.stderr + proc.stdout).strip()
            if ACCOUNTING_OFF in text.lower():
                return ""
            raise LookupFailed(f"sacct failed (exit {proc.returncode}): {text[:200] or '(no output)'}")
        return proc.stdout

    def status(self, job_ids: Sequence[str], env: Env = None) -> Dict[str, JobState]:
        ids = list(dict.fromkeys(str(i) for i in job_ids))
        if not ids:
            return {}
        rows = self._squeue(ids, env)
        result = _match(ids, rows)
        missing = [i for i in ids if i not in result]
        if missing:
            result.update(_match(missing, self._sacct(missing, env)))
        return {i: result.get(i, JobState("unknown")) for i in ids}

    def check(self, text: str) -> List[str]:
        return [msg for rule in RULES for msg in rule(text)]

    def _squeue(self, ids: List[str], env: Env) -> List[Tuple[str, JobState]]:
        argv = ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"]
        proc = self.run(argv, env=env)
        if proc.returncode != 0:
            # squeue fails this way when it knows none of the ids: all unknown, not an error.
            if "invalid job id" in (proc.stderr + proc.stdout).lower():
                return []
            raise TransientError(f"squeue failed (exit {proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()}")
        rows = []
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 2 or not parts[0]:
                continue
            raw, reason = parts[1].strip(), (parts[2].strip() if len(parts) > 2 else "")
            rows.append((parts[0].strip(), JobState(
                map_state(raw), reason=reason if reason and reason != "None" else raw,
                source="squeue")))
        return rows

    def _sacct(self, ids: List[str], env: Env) -> List[Tuple[str, JobState]]:
        argv = ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State,ExitCode"]
        try:
            proc = self.run(argv, env=env)
        except (TransientError, UserError):
            return []
        # Without accounting sacct exits 1 ("Slurm accounting storage is disabled"): squeue
        # was all there is, so its silence means unknown.
        if proc.returncode != 0:
            return []
        rows = []
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 2 or not parts[0]:
                continue
            raw = parts[1].strip()
            rows.append((parts[0].strip(), JobState(
                map_state(raw), exit_code=parse_exit_code(parts[2]) if len(parts) > 2 else None,
                reason=raw, source="sacct")))
        return rows


def _pick(rows: str, token: str, workdir: Optional[Path], exclude: Sequence[str]) -> Optional[str]:
    """The newest job among "id|comment|workdir" rows that carries the token (or, its comment not
    stored, ran in ``workdir``), leaving out ``exclude``."""
    found = set()
    for line in rows.splitlines():
        job_id, _, rest = line.strip().partition("|")
        comment, _, where = rest.partition("|")
        ours = comment.strip() == token or (
            not comment.strip() and workdir is not None and where.strip() == str(workdir))
        if ours and job_id.strip() and base_id(job_id.strip()) not in exclude:
            found.add(base_id(job_id.strip()))
    return max(found, key=_id_key) if found else None


def _id_key(job_id: str):
    return (int(job_id), "") if job_id.isdigit() else (-1, job_id)


def _match(ids: Sequence[str], rows: List[Tuple[str, JobState]]) -> Dict[str, JobState]:
    """Per requested id, the aggregate of its rows (a master id collects its array tasks)."""
    out = {}
    for i in ids:
        # Later rows win for the same task (sacct lists a requeued job's latest run last).
        tasks = {row_id: st for row_id, st in rows if row_id == i or base_id(row_id) == i}
        if tasks:
            out[i] = aggregate(list(tasks.values()))
    return out
