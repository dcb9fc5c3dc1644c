"""PBS Professional / OpenPBS backend: qsub to submit, ``qstat -x -f -F json`` to track.

Torque is not supported: its ``qstat`` has no ``-x`` (no job history) and no JSON output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from knl_train.errors import UserError
from knl_train.studies import walltime

from . import (Env, JobState, LookupFailed, Scheduler, TransientError, check_directives_first,
               check_foreign_directives, check_shebang, command_program, directive_lines,
               is_command, logical_lines, split_words)

TRANSIENT_PATTERNS = (
    "cannot connect to server",
    "pbs_iff",
    # A queue or per-user job limit clears as our own jobs finish: waiting is the fix.
    "Maximum number of jobs already in queue",
    "Server is busy",
    "Connection refused",
    "timed out",
)

# qstat's words for an id it no longer has: such ids are "unknown", not a failed query.
GONE_PATTERNS = ("Unknown Job Id", "Job has finished")
_GONE_ID = re.compile(r"Unknown Job Id(?: Error)?:?\s+(\S+)", re.IGNORECASE)

PENDING_STATES = frozenset("QHWTSU")
RUNNING_STATES = frozenset("REB")     # B: an array job with subjobs begun; E: exiting
FINISHED_STATES = frozenset("FX")     # X: a finished subjob

# Negative Exit_status values are the server's JOB_EXEC_* codes (OpenPBS src/include/job.h).
KILL_WALLTIME = -29
EXEC_CODES = {
    -1: "JOB_EXEC_FAIL1", -2: "JOB_EXEC_FAIL2", -3: "JOB_EXEC_RETRY",
    -4: "JOB_EXEC_INITABT", -5: "JOB_EXEC_INITRST", -6: "JOB_EXEC_INITRMG",
    -7: "JOB_EXEC_BADRESRT", -10: "JOB_EXEC_FAILUID", -11: "JOB_EXEC_RERUN",
    -24: "JOB_EXEC_KILL_NCPUS_BURST", -25: "JOB_EXEC_KILL_NCPUS_SUM",
    -26: "JOB_EXEC_KILL_VMEM", -27: "JOB_EXEC_KILL_MEM", -28: "JOB_EXEC_KILL_CPUT",
    -29: "JOB_EXEC_KILL_WALLTIME",
}
_WALLTIME_KILL = re.compile(r"walltime.*exceed|exceed.*walltime", re.IGNORECASE)
_JOB_ID = re.compile(r"^\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?$")

# Chunk resources PBS Pro defines itself (pbs_resources(7B)); sites add their own, which we
# accept when they look like resource names.
KNOWN_CHUNK_KEYS = frozenset({
    "ncpus", "mpiprocs", "ompthreads", "mem", "vmem", "vntype", "host", "vnode", "model", "arch",
    "ngpus", "naccelerators", "accelerator", "accelerator_model", "accelerator_memory", "aoe",
    "eoe",
})
INTEGER_CHUNK_KEYS = ("ncpus", "mpiprocs", "ompthreads", "ngpus", "naccelerators")
# Job-wide resources: inside a chunk PBS rejects or misreads them.
JOB_WIDE_KEYS = frozenset({"walltime", "place", "select", "cput", "pcput", "nodes"})
_RESOURCE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
PLACE_ARRANGEMENTS = frozenset({"free", "pack", "scatter", "vscatter"})
PLACE_SHARING = frozenset({"excl", "shared", "exclhost"})
LAUNCHERS = frozenset({"mpirun", "mpiexec", "aprun", "srun", "knl-train"})
_CD_WORKDIR = re.compile(r'^cd\s+("?)\$(PBS_O_WORKDIR|\{PBS_O_WORKDIR\})\1\s*(?:(?:\|\||&&|;).*)?$')
_PBS_FLAGS = set("VzIXhf")    # qsub options without a value
_ARRAY_RANGE = re.compile(r"^(\d+)-(\d+)(?::(\d+))?(?:%(\d+))?$")


def parse_select(value: str) -> List[Dict[str, str]]:
    """Chunks of a ``select=`` statement, each a dict with ``count`` and its resources.

    ``"2:ncpus=40:mpiprocs=2+1:ncpus=4"`` ->
    ``[{"count": "2", "ncpus": "40", "mpiprocs": "2"}, {"count": "1", "ncpus": "4"}]``.
    A chunk without a leading count has count "1" (PBS's default). Values are kept as text;
    :meth:`Pbs.check` judges them. Raises ValueError for malformed text.
    """
    value = value.strip()
    if value.startswith("select="):
        value = value[len("select="):]
    chunks = []
    for text in value.split("+"):
        parts = text.strip().split(":")
        if not text.strip() or any(not p.strip() for p in parts):
            raise ValueError(f"empty chunk or resource in select={value!r}")
        chunk = {"count": "1"}
        if "=" not in parts[0]:
            chunk["count"] = parts.pop(0).strip()
        for part in parts:
            key, eq, val = part.partition("=")
            key, val = key.strip(), val.strip()
            if not eq or not key or not val:
                raise ValueError(f"{part!r} in select={value!r} is not resource=value")
            if key in chunk:
                raise ValueError(f"{key} given twice in chunk {text!r}")
            chunk[key] = val
        chunks.append(chunk)
    return chunks


def classify_finished(exit_status: Optional[int], comment: str) -> Tuple[str, str]:
    """(state, detail) for a finished job (F) or subjob (X)."""
    if exit_status == KILL_WALLTIME or _WALLTIME_KILL.search(comment or ""):
        return "timeout", "walltime exceeded"
    if exit_status is None:
        return "cancelled", "no exit status (deleted before it ran)"
    if exit_status == 0:
        return "completed", ""
    if exit_status >= 256:
        # PBS reports a job killed by signal N as 256+N (qdel: SIGTERM, 271).
        return "cancelled", f"killed by signal {exit_status - 256}"
    if exit_status < 0:
        return "failed", EXEC_CODES.get(exit_status, "JOB_EXEC error")
    return "failed", ""


def job_state(info: dict) -> JobState:
    """Our state for one job's ``qstat -f -F json`` attributes."""
    letter = str(info.get("job_state", "")).strip().upper()[:1]
    comment = str(info.get("comment", "") or "").strip()
    exit_status = _int(info.get("Exit_status"))
    if letter in FINISHED_STATES:
        state, detail = classify_finished(exit_status, comment)
        reason = f"{letter} (Exit_status {exit_status})" if exit_status is not None else letter
        extra = "; ".join(x for x in (detail, comment) if x)
        return JobState(state, exit_code=exit_status, source="qstat",
                        reason=f"{reason}: {extra}" if extra else reason)
    if letter in PENDING_STATES:
        state = "pending"
    elif letter in RUNNING_STATES:
        state = "running"
    else:  # M (moved to another server) and anything new
        state = "unknown"
    return JobState(state, reason=f"{letter}: {comment}" if comment else letter, source="qstat")


def _int(value) -> Optional[int]:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _workdir(info: dict) -> Optional[str]:
    """PBS_O_WORKDIR from a job's Variable_List (an object in -F json; "K=V,K=V" text elsewhere)."""
    variables = info.get("Variable_List")
    if isinstance(variables, dict):
        return variables.get("PBS_O_WORKDIR")
    for item in str(variables or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "PBS_O_WORKDIR":
            return value
    return None


def _same_job(requested: str, listed: str) -> bool:
    """qstat may print the server's full name ("1234.pbs01.example.org" for "1234.pbs01")."""
    if requested == listed:
        return True
    return listed.startswith(requested + ".") or requested.startswith(listed + ".")


# -- checker rules ------------------------------------------------------------------------------

def pbs_options(text: str) -> List[Tuple[int, str, Optional[str]]]:
    """(line number, option letter, value) for every #PBS option."""
    out = []
    for n, words in directive_lines(text, "#PBS"):
        i = 0
        while i < len(words):
            w = words[i]
            i += 1
            if not w.startswith("-") or len(w) < 2:
                continue
            letter = w[1]
            if len(w) > 2:
                out.append((n, letter, w[2:]))
            elif letter in _PBS_FLAGS or i >= len(words):
                out.append((n, letter, None))
            else:
                out.append((n, letter, words[i]))
                i += 1
    return out


def resources(text: str) -> List[Tuple[int, str, str]]:
    """(line number, resource, value) for every ``-l`` resource, comma lists split."""
    out = []
    for n, letter, value in pbs_options(text):
        if letter == "l" and value:
            for item in value.split(","):
                key, _, val = item.partition("=")
                out.append((n, key.strip(), val.strip()))
    return out


def rule_shebang(text: str) -> List[str]:
    return check_shebang(text)


def rule_no_sbatch(text: str) -> List[str]:
    return check_foreign_directives(
        text, ("#SBATCH",), "one file holds one directive family (sbatch would also read #PBS)")


def rule_directives_first(text: str) -> List[str]:
    return check_directives_first(text, "#PBS", "qsub")


def rule_job_name(text: str) -> List[str]:
    problems = []
    for n, letter, value in pbs_options(text):
        if letter != "N":
            continue
        value = value or ""
        if len(value) > 15:
            problems.append(f"[job-name] line {n}: -N {value!r} has {len(value)} characters; "
                            f"PBS allows at most 15")
        if not value[:1].isalpha() or not value[:1].isascii():
            problems.append(f"[job-name] line {n}: -N {value!r} must start with a letter")
        if any(c.isspace() for c in value):
            problems.append(f"[job-name] line {n}: -N {value!r} contains whitespace")
    return problems


def rule_select(text: str) -> List[str]:
    selects = [(n, v) for n, key, v in resources(text) if key == "select"]
    if len(selects) != 1:
        where = ", ".join(f"line {n}" for n, _ in selects) or "none found"
        return [f"[select] exactly one -l select= is required ({where})"]
    n, value = selects[0]
    try:
        chunks = parse_select(value)
    except ValueError as e:
        return [f"[select] line {n}: {e}"]
    problems = []
    for k, chunk in enumerate(chunks, 1):
        problems += [f"[select] line {n}: chunk {k}: {msg}" for msg in check_chunk(chunk)]
    return problems


def check_chunk(chunk: Dict[str, str]) -> List[str]:
    """Problems with one parsed select chunk."""
    problems = []
    if not re.fullmatch(r"[1-9]\d*", chunk.get("count", "")):
        problems.append(f"count {chunk.get('count')!r} is not a positive integer")
    for key in chunk:
        if key == "count":
            continue
        if key in JOB_WIDE_KEYS:
            problems.append(f"{key} is a job-wide resource: give it as its own -l {key}=")
        elif key not in KNOWN_CHUNK_KEYS and not _RESOURCE_NAME.match(key):
            problems.append(f"{key!r} is not a resource name")
    ints = {}
    for key in INTEGER_CHUNK_KEYS:
        if key in chunk:
            if re.fullmatch(r"\d+", chunk[key]):
                ints[key] = int(chunk[key])
            else:
                problems.append(f"{key}={chunk[key]!r} is not an integer")
    if "ncpus" not in chunk:
        if "mpiprocs" in chunk or "ompthreads" in chunk:
            problems.append("mpiprocs/ompthreads without ncpus (the server's default chunk, "
                            "usually ncpus=1, would apply)")
    elif "ncpus" in ints:
        # PBS defaults: mpiprocs 1, ompthreads = ncpus; so a chunk with mpiprocs=2 and no
        # ompthreads gives every rank all the chunk's threads.
        mpiprocs = ints.get("mpiprocs", 1 if "mpiprocs" not in chunk else None)
        ompthreads = ints.get("ompthreads", ints["ncpus"] if "ompthreads" not in chunk else None)
        if mpiprocs is not None and ompthreads is not None and \
                ints["ncpus"] != mpiprocs * ompthreads:
            problems.append(f"ncpus={ints['ncpus']} != mpiprocs={mpiprocs} x "
                            f"ompthreads={ompthreads}" +
                            ("" if "ompthreads" in chunk else " (ompthreads defaults to ncpus)"))
    return problems


def rule_place(text: str) -> List[str]:
    problems = []
    for n, key, value in resources(text):
        if key != "place":
            continue
        seen: Dict[str, str] = {}
        for part in value.split(":"):
            if part in PLACE_ARRANGEMENTS:
                kind = "arrangement"
            elif part in PLACE_SHARING:
                kind = "sharing"
            elif re.fullmatch(r"group=[A-Za-z][A-Za-z0-9_-]*", part):
                kind = "grouping"
            else:
                problems.append(f"[place] line {n}: {part!r} in place={value} is none of "
                                f"{sorted(PLACE_ARRANGEMENTS)}, {sorted(PLACE_SHARING)}, "
                                f"group=<resource>")
                continue
            if kind in seen:
                problems.append(f"[place] line {n}: place={value} gives two {kind}s "
                                f"({seen[kind]}, {part})")
            seen[kind] = part
    return problems


def rule_walltime(text: str) -> List[str]:
    return [f"[walltime] line {n}: walltime={value!r} is neither HH:MM:SS nor seconds"
            for n, key, value in resources(text) if key == "walltime"
            and not walltime.valid_pbs(value)]


def rule_no_cput(text: str) -> List[str]:
    return [f"[no-cput] line {n}: -l {key} limits CPU time summed over all processes, not "
            f"elapsed time; use -l walltime=" for n, key, _ in resources(text)
            if key in ("cput", "pcput")]


def rule_cd_workdir(text: str) -> List[str]:
    cd_line = None
    for n, line in logical_lines(text):
        if not is_command(line):
            continue
        if cd_line is None and _CD_WORKDIR.match(re.split(r"\s+#", line.strip())[0]):
            cd_line = n
        program, _ = command_program(split_words(line))
        if program in LAUNCHERS or (program or "").startswith("mpiexec"):
            if cd_line is None:
                return [f"[cd-workdir] line {n}: {program} runs before cd \"$PBS_O_WORKDIR\"; PBS "
                        f"starts jobs in $HOME"]
            return []
    if cd_line is None:
        return ['[cd-workdir] no cd "$PBS_O_WORKDIR": PBS starts jobs in $HOME']
    return []


def rule_array(text: str) -> List[str]:
    problems = []
    for n, letter, value in pbs_options(text):
        if letter != "J":
            continue
        m = _ARRAY_RANGE.match(value or "")
        if not m:
            problems.append(f"[array] line {n}: -J {value!r} is not a-b[:step][%max]")
            continue
        first, last = int(m.group(1)), int(m.group(2))
        step = int(m.group(3) or 1)
        limit = m.group(4)
        if step < 1 or first + step > last:
            problems.append(f"[array] line {n}: -J {value} has fewer than two indices; PBS "
                            f"arrays need at least two (drop -J for a single job)")
        if limit is not None and int(limit) < 1:
            problems.append(f"[array] line {n}: -J {value}: %max must be at least 1")
    return problems


RULES = (rule_shebang, rule_no_sbatch, rule_directives_first, rule_job_name, rule_select,
         rule_place, rule_walltime, rule_no_cput, rule_cd_workdir, rule_array)


class Pbs(Scheduler, name="pbs", script_name="job.pbs", directive="#PBS",
          submit_command="qsub", status_command="qstat",
          transient_patterns=TRANSIENT_PATTERNS):
    """PBS Professional / OpenPBS."""

    def submit_argv(self, script: Path, after: Optional[str]) -> List[str]:
        argv = ["qsub"]
        if after:
            argv += ["-W", f"depend=afterany:{after}"]
        return argv + [str(script)]

    def parse_job_id(self, stdout: str) -> Optional[str]:
        words = stdout.split()
        # The id is "<sequence>.<server>": keep it whole, other servers' jobs share sequences.
        job_id = words[0] if words else ""
        return job_id if _JOB_ID.match(job_id) else None

    def find(self, job_name: str, token: str, env: Env = None, *, workdir: Optional[Path] = None,
             exclude: Sequence[str] = ()) -> Optional[str]:
        """The newest job in ``qstat -x`` (finished ones too, while the server keeps history)
        with this name that was submitted from ``workdir``, the point's directory.

        The token cannot be used: users cannot set the ``comment`` attribute that would carry it
        (the scheduler overwrites it). Names are cut to 15 characters, so they are not unique
        across studies; the job's PBS_O_WORKDIR is. Without ``workdir``, None.
        """
        if workdir is None:
            return None
        try:
            jobs, failed = self._qstat([], env)
        except (TransientError, UserError) as e:
            raise LookupFailed(f"qstat could not be asked ({e})") from None
        if failed:
            raise LookupFailed(f"qstat -x failed: {failed[:200]}")
        found = [job_id for job_id, info in jobs.items()
                 if isinstance(info, dict) and info.get("Job_Name") == job_name
                 and _workdir(info) == str(workdir)
                 and not any(_same_job(e, job_id) for e in exclude)]
        return max(found, key=lambda i: int(re.match(r"\d+", i).group(0))) if found else None

    def status(self, job_ids: Sequence[str], env: Env = None) -> Dict[str, JobState]:
        ids = list(dict.fromkeys(str(i) for i in job_ids))
        if not ids:
            return {}
        found, failed = self._qstat(ids, env)
        result = _match(ids, found)
        missing = [i for i in ids if i not in result]
        if failed and missing:
            self._raise_unless_gone(failed, ids)
            named = set(_GONE_ID.findall(failed))
            rest = [i for i in missing if not any(_same_job(i, g) for g in named)]
            if len(ids) > 1:
                # One unknown id can spoil the whole batched answer: ask for the others singly.
                for i in rest:
                    one, one_failed = self._qstat([i], env)
                    result.update(_match([i], one))
                    if one_failed and i not in result:
                        self._raise_unless_gone(one_failed, [i])
        return {i: result.get(i, JobState("unknown")) for i in ids}

    def check(self, text: str) -> List[str]:
        return [msg for rule in RULES for msg in rule(text)]

    def _qstat(self, ids: List[str], env: Env) -> Tuple[Dict[str, dict], str]:
        """(jobs qstat printed, error text if it failed)."""
        proc = self.run(["qstat", "-x", "-f", "-F", "json", *ids], env=env)
        jobs: Dict[str, dict] = {}
        if proc.stdout.strip():
            try:
                # strict=False: values such as Variable_List may hold raw control characters.
                jobs = json.loads(proc.stdout, strict=False).get("Jobs") or {}
            except (json.JSONDecodeError, AttributeError) as e:
                if proc.returncode == 0:
                    raise UserError(f"qstat -F json printed output that is not JSON ({e}); "
                                    f"this PBS may be too old for -F json (needs PBS Pro 14 "
                                    f"or OpenPBS)") from None
        failed = ""
        if proc.returncode != 0:
            failed = (proc.stderr.strip() or proc.stdout.strip()
                      or f"qstat exited {proc.returncode}")
        return jobs, failed

    def _raise_unless_gone(self, error: str, ids: Sequence[str]) -> None:
        if not any(p.lower() in error.lower() for p in GONE_PATTERNS):
            raise TransientError(f"qstat {' '.join(ids)} failed: {error}")


def _match(ids: Sequence[str], jobs: Dict[str, dict]) -> Dict[str, JobState]:
    out = {}
    for i in ids:
        info = jobs.get(i)
        if info is None:
            info = next((v for k, v in jobs.items() if _same_job(i, k)), None)
        if isinstance(info, dict):
            out[i] = job_state(info)
    return out
