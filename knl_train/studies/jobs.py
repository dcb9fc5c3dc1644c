"""Submit a rendered study and follow its jobs.

Submission is idempotent: a point's job id is written to the manifest (atomically) as soon as
the scheduler returns it, and a point with an id is never submitted again. A point whose
submission was cut off (state "submitting") is looked up by its job name and token first.

Status combines, per job: the scheduler's answer (squeue / sacct / qstat), and the record the
job writes itself (``job-<id>.json``: start, end, exit code), which still speaks when the
scheduler has forgotten the job and accounting is off.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from knl_train.errors import UserError
from knl_train.studies import manifest as manifest_file
from knl_train.studies import schedulers
from knl_train.studies.schedulers import JobState


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---- submit ----------------------------------------------------------------------------------------
def submit(study_dir, *, attempts: int = 5, base_delay: float = 2.0, resubmit: bool = False,
           env=None, log: Callable[[str], None] = print, sleep=time.sleep) -> List[dict]:
    """Submit every point without a job; returns [{id, job_id, new}] in point order."""
    study_dir = Path(study_dir).resolve()
    out = []
    with manifest_file.locked(study_dir):
        m = manifest_file.load(study_dir)
        backend = schedulers.get(m["scheduler"])
        previous = None
        for p in m["points"]:
            job = p.setdefault("job", {"id": None, "state": "rendered"})
            if job.get("id"):
                out.append({"id": p["id"], "job_id": job["id"], "new": False})
                previous = job["id"]
                continue
            if job.get("state") == "submitting":
                found = backend.find(p["job_name"], p.get("token", ""), env=env)
                if found:
                    log(f"{p['id']}: found job {found}, submitted before an interruption; recorded it")
                    _record(study_dir, m, job, id=found, state="submitted", submitted=_now(), adopted=True)
                    out.append({"id": p["id"], "job_id": found, "new": False})
                    previous = found
                    continue
                if backend.name == "pbs" and not resubmit:
                    raise UserError(
                        f"{p['id']}: an earlier submission was cut off before qsub's job id was recorded, "
                        f"and PBS cannot look a job up by token. Check `qstat -u $USER` for a job named "
                        f"{p['job_name']}; if there is none, run `knl-train study submit {study_dir} --resubmit`")
            after = previous if m.get("chain") else None
            _record(study_dir, m, job, state="submitting", error=None)
            script = study_dir / p["script"]
            try:
                job_id = schedulers.submit_with_retry(
                    backend, script, cwd=script.parent, after=after, env=env, attempts=attempts,
                    base_delay=base_delay, sleep=sleep, log=log, job_name=p["job_name"], token=p.get("token"))
            except schedulers.RetriesExhausted as e:
                # The last attempt may have queued the job: stay "submitting", so the next run
                # looks for it before submitting again.
                _record(study_dir, m, job, error=str(e).splitlines()[0])
                raise
            except UserError as e:
                # The scheduler answered with a refusal: nothing is queued for this point.
                _record(study_dir, m, job, state="submit-failed", error=str(e).splitlines()[0])
                raise
            _record(study_dir, m, job, id=job_id, state="submitted", submitted=_now(), after=after)
            log(f"{p['id']}: {p['nodes']} node(s), job {job_id}" + (f" (after {after})" if after else ""))
            out.append({"id": p["id"], "job_id": job_id, "new": True})
            previous = job_id
    return out


def _record(study_dir: Path, m: dict, job: dict, **fields) -> None:
    job.update(fields)
    manifest_file.save(study_dir, m)


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


def status(study_dir, *, env=None) -> List[PointStatus]:
    """Each point's state now; the manifest keeps the last known state (it outlives squeue)."""
    study_dir = Path(study_dir).resolve()
    m = manifest_file.load(study_dir)
    backend = schedulers.get(m["scheduler"])
    ids = [p["job"]["id"] for p in m["points"] if (p.get("job") or {}).get("id")]
    answers: Dict[str, JobState] = {}
    if ids:
        answers = backend.status(ids, env=env)
    rows, changed = [], False
    for p in m["points"]:
        job = p.get("job") or {}
        row = _point_status(study_dir, m, p, job, answers.get(job.get("id") or ""))
        rows.append(row)
        if job.get("id") and (job.get("state"), job.get("exit_code")) != (row.state, row.exit_code) \
                and row.state != "unknown":
            job.update(state=row.state, exit_code=row.exit_code, checked=_now())
            changed = True
    if changed:
        try:
            with manifest_file.locked(study_dir):
                fresh = manifest_file.load(study_dir)
                by_id = {p["id"]: p for p in m["points"]}
                for p in fresh["points"]:
                    mine = (by_id.get(p["id"]) or {}).get("job") or {}
                    if mine.get("id") and (p.get("job") or {}).get("id") == mine.get("id"):
                        p["job"] = mine
                manifest_file.save(study_dir, fresh)
        except UserError:
            pass  # a submit holds the lock: it writes the manifest; states are refreshed next time
    return rows


def _point_status(study_dir: Path, m: dict, p: dict, job: dict, answer: Optional[JobState]) -> PointStatus:
    repeats = len(p["run_dirs"])
    done = sum(1 for r in p["run_dirs"] if (study_dir / r / "summary.json").is_file())
    base = dict(id=p["id"], nodes=p["nodes"], job_id=job.get("id"), runs_done=done, repeats=repeats)
    if not job.get("id"):
        state = job.get("state") or "rendered"
        if state == "submitting":
            state = "submit-failed"
        return PointStatus(**base, state=state, exit_code=None, reason=job.get("error") or "", source="manifest")
    records = _job_records(study_dir / p["script"], job["id"])
    expected = repeats if m.get("array") else 1
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
        started = min(r.get("start") or "" for r in records)
        return PointStatus(**base, state="unknown", exit_code=None, source="job record",
                           reason=f"started {started}, no end record, and {m['scheduler']} no longer knows "
                                  "the job: it was killed before it could write one (node failure?)")
    known = job.get("state")
    if known in schedulers.FINISHED:
        return PointStatus(**base, state=known, exit_code=job.get("exit_code"), source="manifest",
                           reason=f"last seen {job.get('checked', '')}")
    return PointStatus(**base, state="unknown", exit_code=None, source="",
                       reason=(answer.reason if answer else "") or f"{m['scheduler']} does not know the job")


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


def wait(study_dir, *, timeout: float, env=None, sleep=time.sleep, clock=time.monotonic,
         on_change: Optional[Callable[[List[PointStatus]], None]] = None) -> List[PointStatus]:
    """Poll until every submitted point has finished, backing off from 1 s to 30 s between queries."""
    deadline = clock() + timeout
    delay, last = 1.0, None
    while True:
        rows = status(study_dir, env=env)
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


def table(rows: List[PointStatus]) -> str:
    header = ("point", "nodes", "job", "state", "exit", "runs", "source", "reason")
    data = [(r.id, str(r.nodes), r.job_id or "-", r.state, "" if r.exit_code is None else str(r.exit_code),
             f"{r.runs_done}/{r.repeats}", r.source, r.reason) for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) if data else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(d, widths)).rstrip() for d in data]
    return "\n".join(lines)
