"""Batch-scheduler backends for scaling studies: one small interface, one backend per file.

A backend submits a rendered job script, finds a job again after a crash, asks for the state of
many jobs in one query, and checks a rendered script's directives before anything is submitted.
Backends: ``slurm`` (:mod:`.slurm`), ``pbs`` (PBS Professional / OpenPBS, :mod:`.pbs`) and
``local`` (this node, one job after another, :mod:`.local`).
Submitting is the base class's (:meth:`Scheduler.submit`: run, check, parse the id); a backend
gives the command line (``submit_argv``) and reads the id from its output (``parse_job_id``).

Errors: :class:`TransientError` is a failure worth retrying (controller busy or unreachable,
command timed out); :class:`~knl_train.errors.UserError` is anything the user has to fix (script
rejected, command not installed).
"""

from __future__ import annotations

import abc
import importlib
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from knl_train import log as knl_log
from knl_train.errors import UserError

log = knl_log.get(__name__)

STATES = ("pending", "running", "completed", "failed", "timeout", "cancelled", "unknown")
FINISHED = frozenset({"completed", "failed", "timeout", "cancelled"})

# Every scheduler command gets a deadline: a hung controller must not hang the study driver.
COMMAND_TIMEOUT = 60.0

Env = Optional[Mapping[str, str]]


@dataclass(frozen=True)
class JobState:
    """One job's state in scheduler-neutral terms (``state`` is one of :data:`STATES`)."""

    state: str
    exit_code: Optional[int] = None
    reason: str = ""   # the scheduler's reason or raw state, e.g. "PartitionNodeLimit"
    source: str = ""   # the command that told us: "squeue", "sacct", "qstat"

    def __post_init__(self):
        if self.state not in STATES:
            raise ValueError(f"job state {self.state!r} is not one of {STATES}")

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class TransientError(Exception):
    """A submission or query failure worth retrying (busy or unreachable scheduler, timeout)."""


class RetriesExhausted(UserError):
    """Every attempt failed transiently: the last one may still have queued the job."""


class LookupFailed(TransientError):
    """The scheduler could not be asked whether a job exists (controller down, command error):
    not knowing is not "none", so nothing may be submitted for it."""


class Scheduler(abc.ABC):
    """The interface every backend implements; see the module docstring."""

    name: ClassVar[str]
    script_name: ClassVar[str]
    directive: ClassVar[str]
    submit_command: ClassVar[str]
    status_command: ClassVar[str]      # what a user asks for a job's state (squeue, qstat)
    transient_patterns: ClassVar[Tuple[str, ...]] = ()

    def __init_subclass__(cls, **described):
        # A backend describes itself on its class line: class Slurm(Scheduler, name="slurm", ...).
        super().__init_subclass__()
        unknown = set(described) - {"name", "script_name", "directive", "submit_command",
                                    "status_command", "transient_patterns"}
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown scheduler attribute(s) {sorted(unknown)}")
        for key, value in described.items():
            setattr(cls, key, value)

    def __init__(self, timeout: float = COMMAND_TIMEOUT):
        self.timeout = timeout

    def submit(self, script: Path, *, cwd: Path, after: Optional[str] = None,
               env: Env = None) -> str:
        """Run the submit command once in ``cwd``; return the job id.

        ``after``: a job id this job waits for (any exit state). Raises TransientError for
        failures matching :attr:`transient_patterns` or a timeout, UserError otherwise.
        """
        proc = self.run(self.submit_argv(script, after), cwd=cwd, env=env)
        if proc.returncode != 0:
            raise self.submit_failed(script, proc)
        job_id = self.parse_job_id(proc.stdout)
        if job_id is None:
            # Accepted, yet no id: the job may be queued, so submitting again could run it twice.
            raise UserError(f"{self.submit_command} accepted {script} but printed no job id: "
                            f"{(proc.stdout + proc.stderr).strip() or '(no output)'!r}; check "
                            f"the job with {self.status_command} before submitting it again")
        return job_id

    @abc.abstractmethod
    def submit_argv(self, script: Path, after: Optional[str]) -> List[str]:
        """The submit command line for ``script``, waiting for job ``after`` if given."""

    @abc.abstractmethod
    def parse_job_id(self, stdout: str) -> Optional[str]:
        """The job id in the submit command's output, or None if there is none."""

    @abc.abstractmethod
    def find(self, job_name: str, token: str, env: Env = None, *, workdir: Optional[Path] = None,
             exclude: Sequence[str] = ()) -> Optional[str]:
        """The id of a job already submitted with this name and token (from ``workdir``, the
        point's directory, where the token cannot be read back), or None; ids in ``exclude``
        (a point's earlier jobs) do not count. Raises LookupFailed when the scheduler cannot
        be asked."""

    @abc.abstractmethod
    def status(self, job_ids: Sequence[str], env: Env = None) -> Dict[str, JobState]:
        """States of all ``job_ids`` from one batched query; ids no longer known are "unknown"."""

    @abc.abstractmethod
    def check(self, text: str) -> List[str]:
        """Problems with a rendered job script, one message each; empty when it is fine."""

    # -- helpers shared by the backends ------------------------------------------------------

    def is_transient(self, text: str) -> bool:
        low = text.lower()
        return any(p.lower() in low for p in self.transient_patterns)

    def run(self, argv: Sequence[str], *, cwd: Optional[Path] = None,
            env: Env = None) -> subprocess.CompletedProcess:
        """Run a scheduler command: UserError if it is not installed, TransientError on timeout."""
        argv = [str(a) for a in argv]
        try:
            return subprocess.run(argv, cwd=None if cwd is None else str(cwd),
                                  env=None if env is None else dict(env),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise TransientError(f"{argv[0]} did not answer within {self.timeout:g} s "
                                 f"({shlex.join(argv)})") from None
        except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
            if cwd is not None and e.filename is not None and \
                    os.path.abspath(str(e.filename)) == os.path.abspath(str(cwd)):
                raise UserError(f"cannot run {argv[0]} in {cwd}: {e.strerror}") from None
            raise UserError(f"{argv[0]} is not installed here ({e.strerror}): run this on a login "
                            f"node of the {self.name} cluster, or load the module that provides "
                            f"{argv[0]}") from None

    def submit_failed(self, script: Path, proc: subprocess.CompletedProcess) -> Exception:
        """The exception for a failed submit command: transient or the user's to fix."""
        output = "\n".join(s.strip() for s in (proc.stderr, proc.stdout) if s and s.strip())
        shown = output or "(no output)"
        if self.is_transient(output):
            return TransientError(f"{self.submit_command} {script} failed (exit {proc.returncode}):"
                                  f" {shown}")
        return UserError(f"{self.submit_command} rejected {script} (exit {proc.returncode}):\n"
                         f"{shown}\nFix what the message names in the script's {self.directive} "
                         f"lines (or in the study's site settings), then submit again.")


# -- registry ---------------------------------------------------------------------------------

# Loaded lazily: the backends import this module for the base class.
BACKENDS: Dict[str, str] = {
    "slurm": "knl_train.studies.schedulers.slurm:Slurm",
    "pbs": "knl_train.studies.schedulers.pbs:Pbs",
    "local": "knl_train.studies.schedulers.local:Local",
}


def get(name: str) -> Scheduler:
    """A new backend instance by name; UserError lists the known names."""
    target = BACKENDS.get(str(name).strip().lower())
    if target is None:
        raise UserError(f"unknown scheduler {name!r}: choose one of {', '.join(sorted(BACKENDS))}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


def detect(text: str) -> str:
    """The scheduler a job script is for, by its directives: #PBS lines mean PBS, #LOCAL lines
    the local runner, else Slurm."""
    if re.search(r"^#PBS", text, re.M):
        return "pbs"
    return "local" if re.search(r"^#LOCAL", text, re.M) else "slurm"


def check_script(path, scheduler: Optional[str] = None) -> Tuple[str, List[str]]:
    """(scheduler, problems) for the job script at ``path``; the scheduler detected if not given."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    name = scheduler or detect(text)
    return name, get(name).check(text)


def submit_with_retry(scheduler: Scheduler, script: Path, *, cwd: Path,
                      after: Optional[str] = None, env: Env = None, attempts: int = 5,
                      base_delay: float = 2.0, max_delay: float = 60.0,
                      sleep: Callable[[float], None] = time.sleep,
                      job_name: Optional[str] = None, token: Optional[str] = None,
                      exclude: Sequence[str] = ()) -> str:
    """Submit, retrying transient failures with exponential backoff; return the job id.

    Delays are ``base_delay * 2**k`` capped at ``max_delay``; each retry is logged as a warning.
    With ``job_name`` and ``token``, each retry first asks :meth:`Scheduler.find`: a submit
    command that timed out may still have queued the job, and submitting it again would run
    the point twice; when that lookup fails, nothing more is submitted (RetriesExhausted).
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    last: Optional[TransientError] = None
    for k in range(attempts):
        if k:
            delay = min(base_delay * 2 ** (k - 1), max_delay)
            log.warning(f"{scheduler.submit_command} {script}: {last}; retry {k}/{attempts - 1} "
                        f"in {delay:g} s")
            sleep(delay)
            if job_name and token:
                try:
                    found = scheduler.find(job_name, token, env=env, workdir=cwd, exclude=exclude)
                except LookupFailed as e:
                    raise RetriesExhausted(
                        f"submitting {script} failed transiently ({last}), and whether that "
                        f"queued a job is unknown: {e}. Nothing more was submitted; check "
                        f"{scheduler.status_command} for a job named {job_name}, then submit again."
                    ) from None
                if found:
                    return found
        try:
            return scheduler.submit(script, cwd=cwd, after=after, env=env)
        except TransientError as e:
            last = e
    raise RetriesExhausted(f"submitting {script} failed {attempts} times with transient "
                    f"{scheduler.name} errors; last: {last}\nThe scheduler looks busy or "
                    f"unreachable: wait a while and submit again.")


# -- script parsing shared by the checkers ----------------------------------------------------

def logical_lines(text: str) -> List[Tuple[int, str]]:
    """(1-based number of the first physical line, text) with backslash continuations joined."""
    out: List[Tuple[int, str]] = []
    pending: Optional[Tuple[int, str]] = None
    for n, line in enumerate(text.splitlines(), 1):
        if pending is not None:
            start, acc = pending
            line = acc + " " + line.lstrip()
            n = start
            pending = None
        if line.endswith("\\") and not line.lstrip().startswith("#"):
            pending = (n, line[:-1].rstrip())
            continue
        out.append((n, line))
    if pending is not None:
        out.append(pending)
    return out


def is_command(line: str) -> bool:
    """A line that ends directive parsing: neither blank nor a comment."""
    s = line.strip()
    return bool(s) and not s.startswith("#")


def split_words(line: str) -> List[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # unbalanced quotes: still give the checker something to look at
        return line.split()


def command_program(words: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """The program a command line runs (basename) and its arguments.

    Skips leading ``VAR=value`` assignments and the ``exec`` / ``time`` prefixes, so
    ``exec srun ...`` and ``OMP_NUM_THREADS=4 mpirun ...`` are recognised.
    """
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("exec", "time") or ("=" in w and not w.startswith(("-", "=")) and
                                     w.split("=", 1)[0].isidentifier()):
            i += 1
            continue
        return os.path.basename(w), list(words[i + 1:])
    return None, []


def directive_lines(text: str, directive: str) -> List[Tuple[int, List[str]]]:
    """(line number, option words) of every line starting with ``directive``."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith(directive) and (len(line) == len(directive) or
                                           line[len(directive)].isspace()):
            out.append((n, split_words(line[len(directive):])))
    return out


def first_command_line(text: str) -> Optional[int]:
    for n, line in enumerate(text.splitlines(), 1):
        if is_command(line):
            return n
    return None


def check_shebang(text: str) -> List[str]:
    if not text.startswith("#!"):
        return ["[shebang] line 1: the script must start with an interpreter line such as "
                "#!/bin/bash"]
    return []


def check_foreign_directives(text: str, foreign: Sequence[str], why: str) -> List[str]:
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        for d in foreign:
            if line.startswith(d):
                problems.append(f"[no-{d[1:].lower()}] line {n}: {d} line in this script; {why}")
    return problems


def check_directives_first(text: str, directive: str, reader: str) -> List[str]:
    first = first_command_line(text)
    if first is None:
        return []
    return [f"[directives-first] line {n}: {directive} after the first command (line {first}); "
            f"{reader} stops reading directives there, so this one is ignored: move it up"
            for n, _ in directive_lines(text, directive) if n > first]


__all__ = ["STATES", "FINISHED", "JobState", "TransientError", "RetriesExhausted", "LookupFailed",
           "Scheduler",
           "BACKENDS", "get", "detect", "check_script", "submit_with_retry", "COMMAND_TIMEOUT"]
