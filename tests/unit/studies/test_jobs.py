"""Study submit / status / wait (knl_train.studies.jobs) against a FAKE scheduler backend.

The fake is a small in-process :class:`~knl_train.studies.schedulers.Scheduler` installed with
monkeypatch on ``schedulers.get`` (the module ``jobs`` calls through). Study directories are
real renders of a small spec into tmp_path; nothing reaches a real scheduler. The real Slurm
end-to-end test lives elsewhere; these tests cover the paths a real scheduler cannot easily
produce on demand: interrupted and refused submissions, transient errors, lock contention,
jobs the scheduler has forgotten, missing or partial job records, and the wait loop's timing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from knl_train.errors import UserError
from knl_train.studies import manifest as manifest_file
from knl_train.studies import render, schedulers, spec, jobs as study_jobs
from knl_train.studies.schedulers import JobState, TransientError
from knl_train.studies.jobs import PointStatus
from tests.support import FIXTURES

STUDIES = FIXTURES / "studies"
IDS = ["n0001", "n0002", "n0004"]
START = "2026-01-02T03:04:05Z"
END = "2026-01-02T03:09:00Z"

SPEC = f"""\
name: track-test
site: {STUDIES / 'ci-slurm.yaml'}
nodes: [1, 2, 4]
ranks_per_node: 1
scaling: weak
per_rank_batch: 8
train: {{config: {STUDIES / 'tiny.yaml'}}}
steps: 3
warmup_steps: 1
"""
VARIANTS = {"plain": "", "array": "repeats: 3\narray: true\n", "chain": "chain: true\n"}


# ---- the fake backend ------------------------------------------------------------------------------
@dataclass
class Submit:
    script: Path
    cwd: Path
    after: Optional[str]
    env: object


class FakeScheduler(schedulers.Scheduler):
    """Records every call; ``outcomes`` queues an exception (or None) per submit call."""

    name = "slurm"
    script_name = "job.sbatch"
    directive = "#SBATCH"
    submit_command = "sbatch"
    status_command = "squeue"

    def __init__(self, name: str = "slurm"):
        super().__init__()
        self.name = name
        self.next_id = 1001
        self.submits: list[Submit] = []
        self.finds: list[tuple] = []
        self.found = None                 # what find() answers (an exception: raised)
        self.find_args: list = []         # (workdir, exclude) per find call
        self.outcomes: list = []          # per submit call: None (succeed) or an exception
        self.states: dict = {}            # job id -> JobState; others are JobState("unknown")
        self.script: list = []            # per status call: a states dict, used before .states
        self.status_calls: list = []
        self.events: list = []
        self.on_submit = None
        self.on_status = None

    def submit(self, script, *, cwd, after=None, env=None):
        self.events.append("submit")
        self.submits.append(Submit(Path(script), Path(cwd), after, env))
        if self.on_submit is not None:
            self.on_submit(Path(script))
        if self.outcomes:
            outcome = self.outcomes.pop(0)
            if outcome is not None:
                raise outcome
        job_id = str(self.next_id)
        self.next_id += 1
        return job_id

    def submit_argv(self, script, after):
        raise AssertionError("the fake submits itself")

    def parse_job_id(self, stdout):
        raise AssertionError("the fake submits itself")

    def find(self, job_name, token, env=None, *, workdir=None, exclude=()):
        self.events.append("find")
        self.finds.append((job_name, token))
        self.find_args.append((workdir, tuple(exclude)))
        if isinstance(self.found, Exception):
            raise self.found
        return self.found

    def status(self, job_ids, env=None):
        self.status_calls.append(list(job_ids))
        if self.on_status is not None:
            self.on_status()
        states = self.script.pop(0) if self.script else self.states
        return {i: states.get(i, JobState("unknown")) for i in job_ids}

    def check(self, text):
        return []


# ---- fixtures and helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """One real render per variant (with the real Slurm backend), copied per test."""
    root = tmp_path_factory.mktemp("track-templates")
    out = {}
    for variant, extra in VARIANTS.items():
        path = root / f"{variant}.yaml"
        path.write_text(SPEC + extra)
        out[variant] = render.write(render.render(spec.load(path)), root / variant)
    return out


@pytest.fixture()
def make_study(templates, tmp_path):
    def _make(variant: str = "plain") -> Path:
        return Path(shutil.copytree(templates[variant], tmp_path / variant)).resolve()
    return _make


@pytest.fixture()
def fake(monkeypatch):
    f = FakeScheduler()
    f.asked = []

    def get(name):
        f.asked.append(name)
        return f

    monkeypatch.setattr(schedulers, "get", get)
    assert study_jobs.schedulers.get is get
    return f


def read(study: Path) -> dict:
    return json.loads((study / "manifest.json").read_text())


def jobs(study: Path) -> list:
    return [p["job"] for p in read(study)["points"]]


def point(study: Path, pid: str) -> dict:
    return next(p for p in read(study)["points"] if p["id"] == pid)


def set_job(study: Path, pid: str, job: dict) -> None:
    m = read(study)
    next(p for p in m["points"] if p["id"] == pid)["job"] = job
    (study / "manifest.json").write_text(json.dumps(m))


def write_record(study: Path, pid: str, key: str, *, state: str, exit_code=None,
                 start: str = START, end: Optional[str] = None, array_index=None) -> Path:
    """A job record as the rendered script's record() writes it."""
    rec = {"job_id": key.split("_")[0], "array_index": array_index, "repeats": "0",
           "state": state, "exit_code": exit_code, "start": start,
           "end": end if state == "finished" else None, "host": "c1", "nodelist": "c1"}
    path = study / "points" / pid / f"job-{key}.json"
    path.write_text(json.dumps(rec) + "\n")
    return path


def submit(study: Path, **options) -> list:
    """study_jobs.submit, its Submissions as dicts; its output lines dropped unless ``echo``."""
    options.setdefault("echo", lambda s: None)
    return [dataclasses.asdict(s) for s in study_jobs.submit(study, **options)]


def submit_all(study: Path, fake: FakeScheduler) -> list:
    out = submit(study)
    assert [r["job_id"] for r in out] == ["1001", "1002", "1003"]
    return out


def by_id(rows) -> dict:
    return {r.id: r for r in rows}


# ---- submit ----------------------------------------------------------------------------------------
def test_rendered_study_is_what_the_tests_assume(make_study):
    m = read(make_study("array"))
    assert m["scheduler"] == "slurm" and m["array"] is True and m["chain"] is False
    assert [p["id"] for p in m["points"]] == IDS
    assert [p["nodes"] for p in m["points"]] == [1, 2, 4]
    assert [len(p["run_dirs"]) for p in m["points"]] == [3, 3, 3]
    assert all(p["job"] == {"id": None, "state": "rendered"} for p in m["points"])
    assert read(make_study("chain"))["chain"] is True


def test_submit_records_ids_in_point_order(make_study, fake):
    study = make_study()
    seen = []

    def on_submit(script):
        # Write-ahead: the point is "submitting" on disk before the scheduler is asked.
        seen.append([(j["id"], j["state"]) for j in jobs(study)])

    fake.on_submit = on_submit
    logs = []
    out = submit(study, env={"SLURM_CONF": "/x"}, echo=logs.append)
    assert out == [{"id": "n0001", "job_id": "1001", "new": True},
                   {"id": "n0002", "job_id": "1002", "new": True},
                   {"id": "n0004", "job_id": "1003", "new": True}]
    assert fake.asked == ["slurm"]
    got = jobs(study)
    assert [j["id"] for j in got] == ["1001", "1002", "1003"]
    assert [j["state"] for j in got] == ["submitted"] * 3
    assert [j["after"] for j in got] == [None, None, None]
    assert all(j["submitted"] and j["error"] is None for j in got)
    assert [s.script for s in fake.submits] == [study / "points" / i / "job.sbatch" for i in IDS]
    assert [s.cwd for s in fake.submits] == [study / "points" / i for i in IDS]
    assert [s.after for s in fake.submits] == [None, None, None]
    assert [s.env for s in fake.submits] == [{"SLURM_CONF": "/x"}] * 3
    assert fake.finds == []
    assert seen == [
        [(None, "submitting"), (None, "rendered"), (None, "rendered")],
        [("1001", "submitted"), (None, "submitting"), (None, "rendered")],
        [("1001", "submitted"), ("1002", "submitted"), (None, "submitting")],
    ]
    assert logs == ["n0001: 1 node(s), job 1001", "n0002: 2 node(s), job 1002",
                    "n0004: 4 node(s), job 1003"]


def test_second_submit_submits_nothing(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    before = read(study)
    again = submit(study)
    assert len(fake.submits) == 3
    assert fake.finds == []
    assert again == [{"id": "n0001", "job_id": "1001", "new": False},
                     {"id": "n0002", "job_id": "1002", "new": False},
                     {"id": "n0004", "job_id": "1003", "new": False}]
    assert read(study) == before


def test_chain_waits_for_the_previous_job(make_study, fake):
    study = make_study("chain")
    logs = []
    submit(study, echo=logs.append)
    assert [s.after for s in fake.submits] == [None, "1001", "1002"]
    assert [j["after"] for j in jobs(study)] == [None, "1001", "1002"]
    assert logs[1] == "n0002: 2 node(s), job 1002 (after 1001)"


def test_chain_continues_after_an_adopted_job(make_study, fake):
    study = make_study("chain")
    set_job(study, "n0001", {"id": "500", "state": "submitted"})
    set_job(study, "n0002", {"id": None, "state": "submitting"})
    fake.found = "77"
    out = submit(study)
    assert [r["job_id"] for r in out] == ["500", "77", "1001"]
    assert [s.script.parent.name for s in fake.submits] == ["n0004"]
    assert fake.submits[0].after == "77"


def test_interrupted_submission_is_adopted(make_study, fake):
    study = make_study()
    p2 = point(study, "n0002")
    set_job(study, "n0002", {"id": None, "state": "submitting"})
    fake.found = "77"
    logs = []
    out = submit(study, echo=logs.append)
    assert out == [{"id": "n0001", "job_id": "1001", "new": True},
                   {"id": "n0002", "job_id": "77", "new": False},
                   {"id": "n0004", "job_id": "1002", "new": True}]
    assert fake.finds == [(p2["job_name"], p2["token"])]
    assert p2["token"].endswith(":n0002") and p2["job_name"] == "track_test_n2"
    assert [s.script.parent.name for s in fake.submits] == ["n0001", "n0004"]
    job = point(study, "n0002")["job"]
    assert (job["id"], job["state"], job["adopted"]) == ("77", "submitted", True)
    assert "n0002: found job 77 (squeue), submitted before an interruption; recorded it" in logs
    assert fake.find_args == [(study / "points" / "n0002", ())]


def test_interrupted_submission_not_found_is_resubmitted_on_slurm(make_study, fake):
    study = make_study()
    p2 = point(study, "n0002")
    set_job(study, "n0002", {"id": None, "state": "submitting"})
    out = submit(study)
    assert out[1] == {"id": "n0002", "job_id": "1002", "new": True}
    assert fake.finds == [(p2["job_name"], p2["token"])]
    assert [s.script.parent.name for s in fake.submits] == IDS
    job = point(study, "n0002")["job"]
    assert (job["id"], job["state"]) == ("1002", "submitted")
    assert "adopted" not in job


def test_interrupted_submission_found_in_the_jobs_own_records(make_study, fake):
    # The job ran and aged out of squeue (no accounting): its record in the point's directory
    # is what is left, and it is enough not to submit a second job.
    study = make_study()
    set_job(study, "n0002", {"id": None, "state": "submitting"})
    write_record(study, "n0002", "640", state="finished", exit_code=0, end=END)
    logs = []
    out = submit(study, echo=logs.append)
    assert out[1] == {"id": "n0002", "job_id": "640", "new": False}
    assert [s.script.parent.name for s in fake.submits] == ["n0001", "n0004"]
    assert "n0002: found job 640 (its own record), submitted before an interruption; recorded it" in logs
    assert (point(study, "n0002")["job"]["id"], point(study, "n0002")["job"]["adopted"]) == ("640", True)
    assert (study_jobs.status(study)[1].state, study_jobs.status(study)[1].source) == ("completed", "job record")


def test_lookup_failure_keeps_the_point_submitting(make_study, fake):
    study = make_study()
    set_job(study, "n0002", {"id": None, "state": "submitting"})
    fake.found = schedulers.LookupFailed("squeue failed (exit 1): slurm_load_jobs error: "
                                         "Unable to contact slurm controller (connect failure)")
    with pytest.raises(UserError) as e:
        submit(study)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("n0002: an earlier submission was cut off, and whether it queued a job is "
                          "unknown: squeue failed (exit 1): slurm_load_jobs error: Unable to contact")
    assert "it stays 'submitting'" in msg and "scontrol ping" in msg and "track_test_n2" in msg
    assert f"run `knl-train study submit {study}` again" in msg
    # Nothing submitted for it, nor after it; the point before it was.
    assert [s.script.parent.name for s in fake.submits] == ["n0001"]
    assert [(j["id"], j["state"]) for j in jobs(study)] == [
        ("1001", "submitted"), (None, "submitting"), (None, "rendered")]
    # The controller answers again and knows no such job: now it is submitted.
    fake.found = None
    out = submit(study)
    assert [r["new"] for r in out] == [False, True, True]
    assert [s.script.parent.name for s in fake.submits] == ["n0001", "n0002", "n0004"]


def test_lookup_failure_with_a_record_adopts_the_recorded_job(make_study, fake):
    study = make_study()
    set_job(study, "n0002", {"id": None, "state": "submitting"})
    fake.found = schedulers.LookupFailed("squeue could not be asked")
    write_record(study, "n0002", "641", state="started")
    out = submit(study)
    assert out[1] == {"id": "n0002", "job_id": "641", "new": False}
    assert [s.script.parent.name for s in fake.submits] == ["n0001", "n0004"]


def test_earlier_pbs_jobs_are_known_by_their_number(make_study, fake):
    # A PBS job "600.pbs01" writes job-600.json: an earlier one of the point, not a lost one.
    fake.name = "pbs"
    study = make_study()
    set_job(study, "n0001", {"id": None, "state": "submitting", "retries": 1, "earlier": ["600.pbs01"]})
    write_record(study, "n0001", "600", state="finished", exit_code=1, end=END)
    assert submit(study)[0] == {"id": "n0001", "job_id": "1001", "new": True}


def test_earlier_jobs_of_a_retried_point_are_not_found_again(make_study, fake):
    study = make_study()
    set_job(study, "n0002", {"id": None, "state": "submitting", "retries": 1, "earlier": ["600"]})
    write_record(study, "n0002", "600", state="finished", exit_code=1, end=END)
    out = submit(study)
    assert out[1] == {"id": "n0002", "job_id": "1002", "new": True}
    assert fake.find_args[0] == (study / "points" / "n0002", ("600",))
    job = point(study, "n0002")["job"]
    assert (job["id"], job["retries"], job["earlier"]) == ("1002", 1, ["600"])


# ---- submit --retry-failed ----------------------------------------------------------------------------
def test_retry_failed_submits_failed_timed_out_and_lost_jobs_again(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    fake.states = {"1001": JobState("completed", 0, "", "squeue"),
                   "1002": JobState("failed", 1, "NODE_FAIL", "squeue"),
                   "1003": JobState("timeout", 0, "TIMEOUT", "squeue")}
    logs = []
    out = submit(study, retry_failed=True, echo=logs.append)
    assert out == [{"id": "n0001", "job_id": "1001", "new": False},
                   {"id": "n0002", "job_id": "1004", "new": True},
                   {"id": "n0004", "job_id": "1005", "new": True}]
    # The same scripts, so the same run directories: the training resumes from its checkpoints.
    assert [s.script.parent.name for s in fake.submits[3:]] == ["n0002", "n0004"]
    assert logs[:2] == ["n0002: job 1002 failed: submitting it again (retry 1); its training resumes "
                        "from its checkpoints", "n0002: 2 node(s), job 1004"]
    got = jobs(study)
    assert [(j["id"], j.get("retries"), j.get("earlier")) for j in got] == [
        ("1001", None, None), ("1004", 1, ["1002"]), ("1005", 1, ["1003"])]
    assert [j["state"] for j in got] == ["completed", "submitted", "submitted"]
    # Without the option, or once the new jobs are fine, nothing more is submitted.
    assert [r["new"] for r in submit(study)] == [False] * 3
    fake.states = {i: JobState("completed", 0, "", "squeue") for i in ("1001", "1004", "1005")}
    assert [r["new"] for r in submit(study, retry_failed=True)] == [False] * 3
    # A second failure is the second retry.
    fake.states["1004"] = JobState("failed", 1, "FAILED", "squeue")
    submit(study, retry_failed=True)
    job = point(study, "n0002")["job"]
    assert (job["id"], job["retries"], job["earlier"]) == ("1006", 2, ["1002", "1004"])


def test_retry_failed_leaves_running_cancelled_and_unsure_jobs(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    fake.states = {"1001": JobState("running", None, "", "squeue"),
                   "1002": JobState("cancelled", None, "CANCELLED by 0", "squeue")}
    write_record(study, "n0004", "1003", state="started")
    fake.on_status = None
    out = submit(study, retry_failed=True)
    # n0004: started, no end, forgotten by the scheduler: lost (a node failure), so retried.
    assert [r["new"] for r in out] == [False, False, True]
    # With the controller down, a started job without an end record may still run: not retried.
    study2 = make_study("chain")
    submit(study2)

    def down():
        raise TransientError("squeue failed (exit 1): Unable to contact slurm controller")
    fake.on_status = down
    write_record(study2, "n0001", "1005", state="started")
    write_record(study2, "n0002", "1006", state="finished", exit_code=3, end=END)
    warned = []
    rows = study_jobs.status(study2, warn=warned.append)
    assert [(r.state, r.source) for r in rows] == [("unknown", "job record"), ("failed", "job record"),
                                                   ("unknown", "manifest")]
    assert len(warned) == 1
    out = submit(study2, retry_failed=True)
    assert [r["new"] for r in out] == [False, True, False]


# ---- status with the controller down ---------------------------------------------------------------
def test_status_with_the_controller_down_reads_the_jobs_records(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    set_job(study, "n0004", {"id": "1003", "state": "completed", "exit_code": 0, "checked": END})

    def down():
        raise TransientError("squeue failed (exit 1): slurm_load_jobs error: Unable to contact slurm controller")
    fake.on_status = down
    write_record(study, "n0001", "1001", state="finished", exit_code=0, end=END)
    write_record(study, "n0002", "1002", state="started")
    warned = []
    rows = study_jobs.status(study, warn=warned.append)
    assert [(r.state, r.exit_code, r.source) for r in rows] == [
        ("completed", 0, "job record"), ("unknown", None, "job record"), ("completed", 0, "manifest")]
    assert rows[0].reason == f"ended {END}; slurm could not be asked"
    assert rows[1].reason == f"started {START} (its own record), no end recorded yet; slurm could not be asked"
    assert warned == ["squeue could not be asked (squeue failed (exit 1): slurm_load_jobs error: Unable to "
                      "contact slurm controller): the states below come from the jobs' own records and "
                      "the manifest; check that slurm answers (scontrol ping; squeue -u $USER)"]
    # What the records say is kept; what nobody knows is not written.
    assert [j["state"] for j in jobs(study)] == ["completed", "submitted", "completed"]


def test_permanent_failure_keeps_earlier_ids_and_rerun_resumes(make_study, fake):
    study = make_study()
    fake.outcomes = [None, UserError("sbatch rejected job.sbatch (exit 1):\n"
                                     "sbatch: error: Invalid account or account/partition")]
    with pytest.raises(UserError, match="Invalid account"):
        submit(study)
    got = jobs(study)
    assert got[0]["id"] == "1001" and got[0]["state"] == "submitted"
    assert got[1]["id"] is None and got[1]["state"] == "submit-failed"
    assert got[1]["error"] == "sbatch rejected job.sbatch (exit 1): sbatch: error: Invalid account or account/partition"
    assert got[2] == {"id": None, "state": "rendered"}

    rows = study_jobs.status(study)
    assert [(r.state, r.job_id, r.source) for r in rows] == [
        ("unknown", "1001", ""), ("submit-failed", None, "manifest"), ("rendered", None, "manifest")]
    assert rows[1].reason == "sbatch rejected job.sbatch (exit 1): sbatch: error: Invalid account or account/partition"

    out = submit(study)
    assert out == [{"id": "n0001", "job_id": "1001", "new": False},
                   {"id": "n0002", "job_id": "1002", "new": True},
                   {"id": "n0004", "job_id": "1003", "new": True}]
    assert [s.script.parent.name for s in fake.submits] == ["n0001", "n0002", "n0002", "n0004"]
    assert fake.finds == []
    got = jobs(study)
    assert [j["id"] for j in got] == ["1001", "1002", "1003"]
    assert got[1]["error"] is None and got[1]["state"] == "submitted"


def test_transient_errors_are_retried_and_find_is_asked_between(make_study, fake, capsys):
    study = make_study()
    p1 = point(study, "n0001")
    fake.outcomes = [TransientError("Socket timed out on send/recv"),
                     TransientError("Unable to contact slurm controller")]
    sleeps, logs = [], []

    def sleep(d):
        sleeps.append(d)
        fake.events.append("sleep")

    out = submit(study, base_delay=0.01, sleep=sleep, echo=logs.append)
    assert out[0] == {"id": "n0001", "job_id": "1001", "new": True}
    assert [j["id"] for j in jobs(study)] == ["1001", "1002", "1003"]
    assert sleeps == [0.01, 0.02]
    assert fake.finds == [(p1["job_name"], p1["token"])] * 2
    assert fake.events == ["submit", "sleep", "find", "submit", "sleep", "find", "submit",
                           "submit", "submit"]
    assert [s.script.parent.name for s in fake.submits] == ["n0001"] * 3 + ["n0002", "n0004"]
    warnings = capsys.readouterr().err.splitlines()
    assert warnings[0].startswith("knl-train: warning: sbatch ")
    assert "retry 1/4 in 0.01 s" in warnings[0] and "Socket timed out" in warnings[0]
    assert logs == ["n0001: 1 node(s), job 1001", "n0002: 2 node(s), job 1002",
                    "n0004: 4 node(s), job 1003"]


def test_transient_retry_adopts_a_job_the_failed_attempt_queued(make_study, fake):
    study = make_study()
    fake.outcomes = [TransientError("Socket timed out on send/recv")]
    fake.found = "4242"
    out = submit(study, base_delay=0.0, sleep=lambda d: None, echo=lambda s: None)
    assert out[0] == {"id": "n0001", "job_id": "4242", "new": True}
    assert [j["id"] for j in jobs(study)] == ["4242", "1001", "1002"]
    assert [s.script.parent.name for s in fake.submits] == ["n0001", "n0002", "n0004"]
    assert fake.events[:3] == ["submit", "find", "submit"]


def test_exhausted_transient_retries_are_looked_up_on_rerun(make_study, fake):
    study = make_study()
    fake.outcomes = [TransientError("Socket timed out on send/recv")] * 2
    with pytest.raises(UserError, match="failed 2 times with transient"):
        submit(study, attempts=2, base_delay=0.0, sleep=lambda d: None, echo=lambda s: None)
    # The last attempt may have queued the job: the point stays "submitting", to be looked up.
    assert point(study, "n0001")["job"]["state"] == "submitting"
    # The last timed-out sbatch did queue the job: find now knows it.
    fake.found = "555"
    submits_before = len(fake.submits)
    submit(study)
    assert point(study, "n0001")["job"]["id"] == "555"
    assert [s.script.parent.name for s in fake.submits[submits_before:]] == ["n0002", "n0004"]


def test_submit_refuses_while_the_study_is_locked(make_study, fake):
    study = make_study()
    before = read(study)
    with manifest_file.locked(study):
        with pytest.raises(UserError, match=r"another knl-train study command is changing .*"
                                            r"wait for it to finish"):
            submit(study)
    assert fake.submits == []
    assert read(study) == before
    assert [r["new"] for r in submit(study)] == [True] * 3


# ---- status ----------------------------------------------------------------------------------------
def test_status_asks_once_for_all_submitted_ids(make_study, fake):
    study = make_study()
    rows = study_jobs.status(study)
    assert fake.status_calls == []
    assert [(r.id, r.state, r.job_id, r.source, r.exit_code) for r in rows] == [
        (i, "rendered", None, "manifest", None) for i in IDS]
    assert rows[0].finished and rows[0].repeats == 1 and rows[0].nodes == 1
    set_job(study, "n0004", {"id": "9", "state": "submitted"})
    study_jobs.status(study)
    assert fake.status_calls == [["9"]]


def test_scheduler_finished_state_wins_over_the_record(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    fake.states = {"1001": JobState("timeout", None, "TIMEOUT", "sacct"),
                   "1002": JobState("cancelled", 0, "CANCELLED by 0", "sacct")}
    write_record(study, "n0001", "1001", state="finished", exit_code=143, end=END)
    write_record(study, "n0002", "1002", state="finished", exit_code=143, end=END)
    rows = by_id(study_jobs.status(study))
    r = rows["n0001"]
    assert (r.state, r.exit_code, r.reason, r.source, r.job_id) == (
        "timeout", 143, "TIMEOUT", "sacct", "1001")   # the code comes from the record
    r = rows["n0002"]
    assert (r.state, r.exit_code, r.source) == ("cancelled", 0, "sacct")
    assert fake.status_calls == [["1001", "1002", "1003"]]


@pytest.mark.parametrize("code, state", [(0, "completed"), (3, "failed")])
def test_job_record_speaks_when_the_scheduler_forgot(make_study, fake, code, state):
    study = make_study()
    submit_all(study, fake)
    write_record(study, "n0001", "1001", state="finished", exit_code=code, end=END)
    r = study_jobs.status(study)[0]
    assert (r.state, r.exit_code, r.source) == (state, code, "job record")
    assert r.reason == f"ended {END}"
    job = jobs(study)[0]
    assert (job["state"], job["exit_code"]) == (state, code)
    assert job["checked"]


def test_started_record_without_end_is_a_lost_job(make_study, fake):
    # Started, never ended, forgotten by the scheduler: killed before its exit trap (a lost node).
    study = make_study()
    submit_all(study, fake)
    write_record(study, "n0001", "1001", state="started", start=START)
    r = study_jobs.status(study)[0]
    assert (r.state, r.exit_code, r.source) == ("failed", None, "job record")
    assert r.reason.startswith(f"started {START}, no end record, and slurm no longer knows the job")
    assert jobs(study)[0]["state"] == "failed"


def test_records_of_other_jobs_are_ignored(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    write_record(study, "n0001", "10010", state="finished", exit_code=0, end=END)
    write_record(study, "n0001", "999", state="finished", exit_code=0, end=END)
    (study / "points" / "n0001" / "job-1001.json.tmp1").write_text("{}")
    r = study_jobs.status(study)[0]
    assert (r.state, r.source, r.reason) == ("unknown", "", "slurm does not know the job")


def test_unreadable_record_is_skipped(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    (study / "points" / "n0001" / "job-1001.json").write_text("{not json")
    r = study_jobs.status(study)[0]
    assert (r.state, r.source) == ("unknown", "")


def test_array_needs_every_task_record(make_study, fake):
    study = make_study("array")
    submit_all(study, fake)
    write_record(study, "n0001", "1001_0", state="finished", exit_code=0, end=END, array_index=0,
                 start="2026-01-02T03:04:07Z")
    write_record(study, "n0001", "1001_1", state="finished", exit_code=0, end=END, array_index=1,
                 start="2026-01-02T03:04:06Z")
    write_record(study, "n0001", "1001_2", state="started", array_index=2,
                 start="2026-01-02T03:04:09Z")

    fake.states = {"1001": JobState("running", None, "", "squeue")}
    r = study_jobs.status(study)[0]
    assert (r.state, r.exit_code, r.source, r.repeats) == ("running", None, "squeue", 3)
    assert jobs(study)[0]["state"] == "running"

    fake.states = {"1001": JobState("pending", None, "Dependency", "squeue")}
    r = study_jobs.status(study)[0]
    assert (r.state, r.reason, r.source) == ("pending", "Dependency", "squeue")

    fake.states = {}
    r = study_jobs.status(study)[0]
    assert (r.state, r.source) == ("failed", "job record")
    assert r.reason.startswith("started 2026-01-02T03:04:06Z, no end record")
    assert jobs(study)[0]["state"] == "failed"      # one task lost: the job failed

    write_record(study, "n0001", "1001_2", state="finished", exit_code=0, array_index=2,
                 start="2026-01-02T03:04:09Z", end="2026-01-02T03:10:00Z")
    r = study_jobs.status(study)[0]
    assert (r.state, r.exit_code, r.source) == ("completed", 0, "job record")
    assert r.reason == "ended 2026-01-02T03:10:00Z"
    assert (jobs(study)[0]["state"], jobs(study)[0]["exit_code"]) == ("completed", 0)


def test_array_worst_task_exit_fails_the_point(make_study, fake):
    study = make_study("array")
    submit_all(study, fake)
    for task, code in enumerate([0, 7, 0]):
        write_record(study, "n0002", f"1002_{task}", state="finished", exit_code=code, end=END,
                     array_index=task)
    r = study_jobs.status(study)[1]
    assert (r.state, r.exit_code, r.source) == ("failed", 7, "job record")


def test_unsubmitted_and_cut_off_points(make_study, fake):
    study = make_study()
    set_job(study, "n0002", {"id": None, "state": "submitting"})
    set_job(study, "n0004", {"id": None, "state": "submit-failed", "error": "sbatch rejected x"})
    rows = study_jobs.status(study)
    assert [(r.state, r.reason, r.source) for r in rows] == [
        ("rendered", "", "manifest"),
        ("submit-failed", "its submission was cut off; `knl-train study submit` looks for its job before "
                          "submitting it again", "manifest"),
        ("submit-failed", "sbatch rejected x", "manifest")]
    assert all(r.finished and r.job_id is None for r in rows)
    assert [j["state"] for j in jobs(study)] == ["rendered", "submitting", "submit-failed"]


def test_runs_done_counts_summaries(make_study, fake):
    study = make_study("array")
    for rel, summary in (("run-0", True), ("run-1", False), ("run-2", True)):
        d = study / "points" / "n0002" / rel
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("")
        if summary:
            (d / "summary.json").write_text("{}")
    (study / "points" / "n0004" / "run-0").mkdir()
    (study / "points" / "n0004" / "run-0" / "summary.json").mkdir()   # not a file
    rows = study_jobs.status(study)
    assert [(r.runs_done, r.repeats) for r in rows] == [(0, 3), (2, 3), (0, 3)]


def test_manifest_keeps_the_last_known_finished_state(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    fake.states = {"1002": JobState("failed", 2, "FAILED", "sacct")}
    rec = write_record(study, "n0001", "1001", state="finished", exit_code=0, end=END)
    rows = study_jobs.status(study)
    assert [(r.state, r.exit_code) for r in rows] == [("completed", 0), ("failed", 2), ("unknown", None)]
    after = jobs(study)
    assert [(j["state"], j.get("exit_code")) for j in after] == [
        ("completed", 0), ("failed", 2), ("submitted", None)]
    checked = after[0]["checked"]

    fake.states = {}
    rec.unlink()
    rows = study_jobs.status(study)
    assert [(r.state, r.exit_code, r.source) for r in rows] == [
        ("completed", 0, "manifest"), ("failed", 2, "manifest"), ("unknown", None, "")]
    assert rows[0].reason == f"last seen {checked}"
    assert jobs(study) == after


def test_status_under_a_submit_lock_reports_but_does_not_write(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    fake.states = {"1001": JobState("running", None, "", "squeue")}
    before = read(study)
    with manifest_file.locked(study):
        rows = study_jobs.status(study)
    assert rows[0].state == "running"
    assert read(study) == before
    study_jobs.status(study)
    assert jobs(study)[0]["state"] == "running"


def test_status_keeps_what_a_concurrent_submit_wrote_for_a_submitted_point(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    set_job(study, "n0004", {"id": None, "state": "rendered"})

    def concurrent_submit():
        # While squeue runs, another command submits n0004.
        set_job(study, "n0004", {"id": "2000", "state": "submitted"})

    fake.on_status = concurrent_submit
    fake.states = {"1001": JobState("running", None, "", "squeue")}
    study_jobs.status(study)
    got = jobs(study)
    assert got[0]["state"] == "running"
    assert (got[2]["id"], got[2]["state"]) == ("2000", "submitted")


def test_status_keeps_a_concurrent_submitting_marker(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    set_job(study, "n0004", {"id": None, "state": "rendered"})

    def interrupted_submit():
        # While squeue runs, a submit marks n0004 "submitting" and is killed before sbatch answers.
        set_job(study, "n0004", {"id": None, "state": "submitting", "error": None})

    fake.on_status = interrupted_submit
    fake.states = {"1001": JobState("running", None, "", "squeue")}
    study_jobs.status(study)
    got = jobs(study)
    assert got[0]["state"] == "running"
    assert got[2]["state"] == "submitting"


# ---- wait ------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t
        self.sleeps: list = []

    def now(self) -> float:
        return self.t

    def sleep(self, d: float) -> None:
        self.sleeps.append(d)
        self.t += d


def states(*names, codes=(None, None, None)) -> dict:
    return {jid: JobState(s, c, "", "squeue") for jid, s, c in zip(("1001", "1002", "1003"), names, codes)}


def test_wait_returns_when_all_finished_and_reports_changes(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    fake.script = [states("pending", "pending", "pending"),
                   states("pending", "pending", "pending"),
                   states("running", "pending", "pending"),
                   states("completed", "completed", "failed", codes=(0, 0, 2))]
    clock, changes = Clock(), []
    rows = study_jobs.wait(study, timeout=1000, sleep=clock.sleep, clock=clock.now,
                      on_change=lambda rows: changes.append([r.state for r in rows]))
    assert [(r.state, r.exit_code) for r in rows] == [("completed", 0), ("completed", 0), ("failed", 2)]
    assert changes == [["pending"] * 3, ["running", "pending", "pending"],
                       ["completed", "completed", "failed"]]
    assert clock.sleeps == [1.0, 1.5, 2.25]
    assert len(fake.status_calls) == 4
    assert [j["state"] for j in jobs(study)] == ["completed", "completed", "failed"]


def test_wait_returns_at_once_when_nothing_is_running(make_study, fake):
    study = make_study()
    clock = Clock()
    rows = study_jobs.wait(study, timeout=0, sleep=clock.sleep, clock=clock.now)
    assert [r.state for r in rows] == ["rendered"] * 3
    assert clock.sleeps == []


def test_wait_timeout_names_the_unfinished_points(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    set_job(study, "n0004", {"id": None, "state": "rendered"})
    fake.states = states("pending", "running")
    clock, changes = Clock(), []
    with pytest.raises(UserError) as e:
        study_jobs.wait(study, timeout=10, sleep=clock.sleep, clock=clock.now, on_change=changes.append)
    assert str(e.value) == (f"still waiting after 10 s: n0001 pending, n0002 running; run "
                            f"`knl-train study status {study}` later")
    assert clock.sleeps == pytest.approx([1.0, 1.5, 2.25, 3.375, 1.875])   # the last one to the deadline
    assert clock.t == pytest.approx(110.0)
    assert len(changes) == 1
    assert len(fake.status_calls) == 6


def test_wait_backoff_is_capped_at_30_seconds(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    fake.script = [states("pending", "pending", "pending")] * 11 + [
        states("completed", "completed", "completed", codes=(0, 0, 0))]
    clock = Clock()
    study_jobs.wait(study, timeout=10_000, sleep=clock.sleep, clock=clock.now)
    expected = [1.0]
    while len(expected) < 11:
        expected.append(min(expected[-1] * 1.5, 30.0))
    assert expected[:4] == [1.0, 1.5, 2.25, 3.375] and expected[-2:] == [30.0, 30.0]
    assert clock.sleeps == pytest.approx(expected)


@pytest.mark.parametrize("state, failed", [
    ("completed", False), ("pending", False), ("running", False), ("rendered", False),
    ("failed", True), ("timeout", True), ("cancelled", True), ("unknown", True), ("submit-failed", True)])
def test_which_states_fail_a_wait(state, failed):
    assert PointStatus("n0001", 1, None, state, None, "", "", 0, 1).failed is failed


# ---- status_text -----------------------------------------------------------------------------------------
def test_table_lines():
    rows = [PointStatus("n0001", 1, "1001", "completed", 0, "ended 2026-01-02T03:05:00Z", "job record", 3, 3),
            PointStatus("n0002", 2, None, "rendered", None, "", "manifest", 0, 3),
            PointStatus("n0004", 16, "123456", "failed", 143, "NonZeroExitCode", "sacct", 1, 3)]
    assert study_jobs.status_text(rows).splitlines() == [
        "point  nodes  job     state      exit  runs  source      reason",
        "n0001  1      1001    completed  0     3/3   job record  ended 2026-01-02T03:05:00Z",
        "n0002  2      -       rendered         0/3   manifest",
        "n0004  16     123456  failed     143   1/3   sacct       NonZeroExitCode",
    ]
    assert study_jobs.status_text([]) == "point  nodes  job  state  exit  runs  source  reason"


def test_table_of_a_real_status(make_study, fake):
    study = make_study()
    submit_all(study, fake)
    write_record(study, "n0002", "1002", state="finished", exit_code=0, end=END)
    lines = study_jobs.status_text(study_jobs.status(study)).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["point", "nodes", "job", "state", "exit", "runs", "source", "reason"]
    assert lines[1].split()[:4] == ["n0001", "1", "1001", "unknown"]
    assert lines[2].split() == ["n0002", "2", "1002", "completed", "0", "0/1", "job", "record",
                                "ended", END]
