"""Submit a rendered study and follow its jobs.

Submission is idempotent: a point's job id is written to the manifest (atomically) as soon as
the scheduler returns it, and a point with an id is never submitted again (but for
``--retry-failed``, once its job has ended badly). A point whose submission was cut off (state
"submitting") is looked up first: the scheduler (squeue then sacct; qstat -x; the local queue),
then the records the jobs write in the point's directory. If the scheduler cannot be asked, the
point stays "submitting": not knowing is never taken for "there is none".

Status combines, per job: the scheduler's answer (squeue / sacct / qstat), and the record the
job writes itself (``job-<id>.json``: start, end, exit code), which still speaks when the
scheduler has forgotten the job and accounting is off.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from knl_train import log as knl_log
from knl_train.errors import UserError
from knl_train.studies import manifest, schedulers
from knl_train.records import SUMMARY
from knl_train.studies.manifest import JobRecord, Manifest, PointRecord
from knl_train.studies.schedulers import Env, JobState

log = knl_log.get(__name__)

# States that end `study status --wait` well, or are not over yet; any other is a failure.
NOT_FAILED = ("completed", "pending", "running", "rendered")
# What `submit --retry-failed` submits again: the job failed (a node lost, too), or hit its
# time limit. Cancelled jobs were someone's decision.
RETRY_STATES = ("failed", "timeout")
# How to see whether a scheduler answers.
CHECK = {"slurm": "scontrol ping; squeue -u $USER", "pbs": "qstat -B; qstat -x -u $USER",
         "local": f"python -m {schedulers.BACKENDS['local'].split(':')[0]} list"}


# ---- submit ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Submission:
    """A point's job after ``submit``."""
    id: str          # the point
    job_id: str
    new: bool        # submitted by this call (False: it had a job, or one was found again)


@dataclass
class _Saved:
    """The manifest as last saved: ``record`` changes a point's job and saves at once."""
    study_dir: Path
    manifest: Manifest

    def record(self, point_id: str, job: JobRecord) -> JobRecord:
        self.manifest = self.manifest.with_job(point_id, job)
        self.manifest.save(self.study_dir)
        return job


def submit(study_dir, *, attempts: int = 5, base_delay: float = 2.0, retry_failed: bool = False,
           env: Env = None, echo: Callable[[str], None] = print,
           sleep: Callable[[float], None] = time.sleep) -> List[Submission]:
    """Submit every point without a job, in point order; one Submission per point.

    ``echo`` gets a line per point submitted or found again (the command's output); transient
    failures are retried (``attempts``, backoff from ``base_delay``) and logged as warnings.
    ``retry_failed``: also points whose job failed or timed out (their training resumes from
    its checkpoints in the same run directories); each retry is counted in the manifest.
    """
    study_dir = Path(study_dir).resolve()
    again = _retryable(study_dir, env) if retry_failed else {}
    out: List[Submission] = []
    with manifest.locked(study_dir):
        saved = _Saved(study_dir, Manifest.load(study_dir))
        backend = schedulers.get(saved.manifest.scheduler)
        for p in saved.manifest.points:
            job = p.job or JobRecord.new()
            if job.id and again.get(p.id, ("",))[0] == job.id:
                echo(f"{p.id}: job {job.id} {again[p.id][1]}: submitting it again (retry "
                     f"{(job.retries or 0) + 1}); its training resumes from its checkpoints")
                job = saved.record(p.id, job.retried())
            if not job.id and job.state == "submitting":
                job = _find_again(saved, backend, p, job, env=env, echo=echo)
            if job.id:
                out.append(Submission(p.id, job.id, new=False))
                continue
            after = out[-1].job_id if saved.manifest.chain and out else None
            job_id = _submit_point(saved, backend, p, job, after, env=env, attempts=attempts,
                                   base_delay=base_delay, sleep=sleep)
            echo(f"{p.id}: {p.nodes} node(s), job {job_id}" + (f" (after {after})" if after else ""))
            out.append(Submission(p.id, job_id, new=True))
    return out


def _retryable(study_dir: Path, env: Env) -> Dict[str, tuple]:
    """(job id, state) per point whose job ended in a RETRY_STATE, as status sees it now."""
    return {r.id: (r.job_id, r.state) for r in status(study_dir, env=env)
            if r.job_id and r.state in RETRY_STATES}


def _find_again(saved: _Saved, backend: schedulers.Scheduler, p: PointRecord, job: JobRecord, *,
                env: Env, echo: Callable[[str], None]) -> JobRecord:
    """A point whose submission was cut off: its job, if the scheduler or the job's own records
    know it; the job unchanged (to be submitted) only when every source could answer."""
    point_dir = (saved.study_dir / (p.script or f"points/{p.id}/x")).parent
    earlier = tuple(job.earlier or ())
    failed = None
    try:
        found = backend.find(p.job_name or "", p.token or "", env=env, workdir=point_dir, exclude=earlier)
    except schedulers.LookupFailed as e:
        found, failed = None, e
    where = backend.status_command
    if not found:
        found, where = _recorded_job(point_dir, earlier), "its own record"
    if found:
        echo(f"{p.id}: found job {found} ({where}), submitted before an interruption; recorded it")
        return saved.record(p.id, job.updated(id=found, state="submitted", submitted=manifest.now(),
                                              adopted=True))
    if failed is not None:
        raise UserError(
            f"{p.id}: an earlier submission was cut off, and whether it queued a job is unknown: "
            f"{_first_lines(str(failed))}. Nothing was submitted for it (it stays 'submitting'); "
            f"check that {backend.name} answers ({CHECK.get(backend.name, where)}) and look for a job "
            f"named {p.job_name}, then run `knl-train study submit {saved.study_dir}` again")
    return job


def _recorded_job(point_dir: Path, earlier) -> Optional[str]:
    """The newest job that wrote a record (job-<id>.json) in the point's directory and is not
    one of its earlier jobs: one the scheduler has forgotten (aged out, no accounting)."""
    # Records are keyed by the id's number: a PBS "1234.server" writes job-1234.json.
    known = {m.group(0) for m in (re.match(r"\d+", e) for e in earlier) if m}
    keys = set()
    for path in point_dir.glob("job-*.json"):
        m = re.fullmatch(r"job-(\d+)(_\d+)?\.json", path.name)
        if m and m.group(1) not in known:
            keys.add(m.group(1))
    return max(keys, key=int) if keys else None


def _submit_point(saved: _Saved, backend: schedulers.Scheduler, p: PointRecord, job: JobRecord,
                  after: Optional[str], *, env: Env, attempts: int, base_delay: float,
                  sleep: Callable[[float], None]) -> str:
    """Submit one point, its state written ahead ("submitting") and after; returns the job id."""
    job = saved.record(p.id, job.updated(state="submitting", error=None))
    script = saved.study_dir / p.script
    try:
        job_id = schedulers.submit_with_retry(
            backend, script, cwd=script.parent, after=after, env=env, attempts=attempts,
            base_delay=base_delay, sleep=sleep, job_name=p.job_name, token=p.token,
            exclude=tuple(job.earlier or ()))
    except schedulers.RetriesExhausted as e:
        # The last attempt may have queued the job: stay "submitting", so the next run
        # looks for it before submitting again.
        saved.record(p.id, job.updated(error=_first_lines(str(e))))
        raise
    except UserError as e:
        # The scheduler answered with a refusal: nothing is queued for this point.
        saved.record(p.id, job.updated(state="submit-failed", error=_first_lines(str(e))))
        raise
    saved.record(p.id, job.updated(id=job_id, state="submitted", submitted=manifest.now(), after=after))
    return job_id


def _first_lines(message: str) -> str:
    """What the manifest keeps of a failed submission: the message and the scheduler's first
    line of output, which usually says why."""
    return " ".join(line.strip() for line in message.splitlines()[:2])


# ---- status ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PointStatus:
    id: str
    nodes: int
    job_id: Optional[str]
    state: str                 # rendered, submit-failed, or a scheduler state (schedulers.STATES)
    exit_code: Optional[int]
    reason: str
    source: str                # squeue, sacct, qstat, job record, manifest
    runs_done: int             # repeats with a summary.json
    repeats: int

    @property
    def finished(self) -> bool:
        return self.state in schedulers.FINISHED or self.state in ("rendered", "submit-failed")

    @property
    def failed(self) -> bool:
        """Neither done well nor still to come: `study status --wait` exits 1 for it."""
        return self.state not in NOT_FAILED


def status(study_dir, *, env: Env = None, warn: Callable[[str], None] = log.warning) -> List[PointStatus]:
    """Each point's state now; the manifest keeps the last known state (it outlives squeue).

    When the scheduler cannot be asked (controller down), the states come from the jobs' own
    records and the manifest, and ``warn`` gets one line that says so.
    """
    study_dir = Path(study_dir).resolve()
    m = Manifest.load(study_dir)
    backend = schedulers.get(m.scheduler)
    ids = [p.job.id for p in m.points if p.job is not None and p.job.id]
    answers: Optional[Dict[str, JobState]] = {}
    try:
        answers = backend.status(ids, env=env) if ids else {}
    except schedulers.TransientError as e:
        answers = None
        warn(f"{backend.status_command} could not be asked ({_first_lines(str(e))}): the states "
             f"below come from the jobs' own records and the manifest; check that {m.scheduler} "
             f"answers ({CHECK.get(m.scheduler, backend.status_command)})")
    rows, learned = [], {}
    for p in m.points:
        job = p.job or JobRecord()
        if answers is None:
            row = _unasked_status(study_dir, m, p, job)
        else:
            row = _point_status(study_dir, m, p, job, answers.get(job.id or ""))
        rows.append(row)
        if job.id and (job.state, job.exit_code) != (row.state, row.exit_code) and row.state != "unknown":
            learned[p.id] = job.updated(state=row.state, exit_code=row.exit_code, checked=manifest.now())
    if learned:
        _save_states(study_dir, learned)
    return rows


def _save_states(study_dir: Path, learned: Dict[str, JobRecord]) -> None:
    """Record the states status learned, for points whose job a submit has not changed meanwhile."""
    try:
        with manifest.locked(study_dir):
            fresh = Manifest.load(study_dir)
            for p in fresh.points:
                mine = learned.get(p.id)
                if mine is not None and p.job is not None and p.job.id == mine.id:
                    fresh = fresh.with_job(p.id, mine)
            fresh.save(study_dir)
    except UserError:
        pass  # a submit holds the lock: it writes the manifest; states are refreshed next time


def _point_status(study_dir: Path, m: Manifest, p: PointRecord, job: JobRecord,
                  answer: Optional[JobState]) -> PointStatus:
    repeats = len(p.run_dirs)
    done = sum(1 for r in p.run_dirs if (study_dir / r / SUMMARY).is_file())
    base = dict(id=p.id, nodes=p.nodes, job_id=job.id, runs_done=done, repeats=repeats)
    if not job.id:
        state, reason = job.state or "rendered", job.error or ""
        if state == "submitting":
            state = "submit-failed"
            reason = reason or ("its submission was cut off; `knl-train study submit` looks for its job "
                                "before submitting it again")
        return PointStatus(**base, state=state, exit_code=None, reason=reason, source="manifest")
    records = _job_records(study_dir / p.script, job.id)
    expected = repeats if m.array else 1
    ended = [r for r in records if r.get("state") == "finished"]
    if answer is not None and answer.finished:
        exit_code = answer.exit_code
        if exit_code is None and ended:
            exit_code = _worst_exit(ended)
        return PointStatus(**base, state=answer.state, exit_code=exit_code, reason=answer.reason,
                           source=answer.source)
    if len(ended) >= expected:
        code = _worst_exit(ended)
        return PointStatus(**base, state="completed" if code == 0 else "failed", exit_code=code,
                           reason=f"ended {max(r.get('end') or '' for r in ended)}", source="job record")
    if answer is not None and answer.state in ("pending", "running"):
        return PointStatus(**base, state=answer.state, exit_code=None, reason=answer.reason, source=answer.source)
    if records:
        # Started, never ended, and the scheduler has forgotten it: killed before its exit trap.
        started = min(r.get("start") or "" for r in records)
        return PointStatus(**base, state="failed", exit_code=None, source="job record",
                           reason=f"started {started}, no end record, and {m.scheduler} no longer knows "
                                  "the job: it was killed before it could write one (node failure?)")
    if job.state in schedulers.FINISHED:
        return PointStatus(**base, state=job.state, exit_code=job.exit_code, source="manifest",
                           reason=f"last seen {job.checked or ''}")
    return PointStatus(**base, state="unknown", exit_code=None, source="",
                       reason=(answer.reason if answer else "") or f"{m.scheduler} does not know the job")


def _unasked_status(study_dir: Path, m: Manifest, p: PointRecord, job: JobRecord) -> PointStatus:
    """A point's state when the scheduler could not be asked: what its job wrote (start, end,
    exit code), else what the manifest last knew."""
    if not job.id:
        return _point_status(study_dir, m, p, job, None)
    row = _point_status(study_dir, m, p, job, JobState("unknown"))
    if row.state in schedulers.FINISHED and not (row.source == "job record" and row.exit_code is None):
        # The job recorded its end, or the manifest knew it had ended.
        return dataclasses.replace(row, reason=f"{row.reason}; {m.scheduler} could not be asked")
    records = _job_records(study_dir / p.script, job.id)
    if records:
        started = min(r.get("start") or "" for r in records)
        reason = f"started {started} (its own record), no end recorded yet"
        source = "job record"
    else:
        seen = job.checked or job.submitted or ""
        reason, source = f"last seen {job.state or 'submitted'} {seen}".rstrip(), "manifest"
    return dataclasses.replace(row, state="unknown", exit_code=None, source=source,
                               reason=f"{reason}; {m.scheduler} could not be asked")


def _job_records(script: Path, job_id: str) -> List[dict]:
    """The job's own records: job-<id>.json, or job-<id>_<task>.json for array tasks."""
    number = re.match(r"\d+", job_id)
    if not number:
        return []
    key = number.group(0)
    out = []
    for path in sorted(script.parent.glob(f"job-{key}*.json")):
        if not re.fullmatch(rf"job-{key}(_\d+)?\.json", path.name):
            continue
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a record is replaced atomically; an unreadable one is someone else's file
    return out


def _worst_exit(records: List[dict]) -> Optional[int]:
    codes = [r.get("exit_code") for r in records if isinstance(r.get("exit_code"), int)]
    bad = [c for c in codes if c != 0]
    return bad[0] if bad else (0 if codes else None)


def wait(study_dir, *, timeout: float, env: Env = None, sleep=time.sleep, clock=time.monotonic,
         on_change: Optional[Callable[[List[PointStatus]], None]] = None) -> List[PointStatus]:
    """Poll until every submitted point has finished, backing off from 1 s to 30 s between queries."""
    deadline = clock() + timeout
    delay, last = 1.0, None
    warned = set()

    def warn_once(line: str) -> None:  # a controller down for an hour: one line, not one per poll
        if line not in warned:
            warned.add(line)
            log.warning(line)

    while True:
        rows = status(study_dir, env=env, warn=warn_once)
        key = [(r.id, r.state) for r in rows]
        if key != last and on_change is not None:
            on_change(rows)
        last = key
        if all(r.finished for r in rows):
            return rows
        if clock() >= deadline:
            waiting = ", ".join(f"{r.id} {r.state}" for r in rows if not r.finished)
            raise UserError(f"still waiting after {timeout:g} s: {waiting}; run `knl-train study status "
                            f"{study_dir}` later")
        sleep(min(delay, max(0.0, deadline - clock())))
        delay = min(delay * 1.5, 30.0)


def status_text(rows: List[PointStatus]) -> str:
    """The status rows as an aligned text table."""
    header = ("point", "nodes", "job", "state", "exit", "runs", "source", "reason")
    data = [(r.id, str(r.nodes), r.job_id or "-", r.state, "" if r.exit_code is None else str(r.exit_code),
             f"{r.runs_done}/{r.repeats}", r.source, r.reason) for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) if data else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(d, widths)).rstrip() for d in data]
    return "\n".join(lines)
