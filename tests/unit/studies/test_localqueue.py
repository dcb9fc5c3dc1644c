"""The local scheduler's queue (knl_train/studies/localqueue.py): records, ids, directives and
time limits, claiming, cancelling, and forgetting old jobs. Every test has its own queue
(XDG_STATE_HOME under tmp_path); nothing here runs a job."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from pathlib import Path

import pytest

from knl_train.errors import UserError
from knl_train.studies import localqueue
from knl_train.studies.localqueue import proc_start, time_limit
from tests.support.localqueue import job_script



def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_queue_dir_follows_xdg_state_home():
    assert localqueue.queue_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == Path("/s/knl-train/local-queue")
    # The XDG spec: a relative XDG_STATE_HOME is invalid and ignored.
    assert localqueue.queue_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == \
        Path("/h/.local/state/knl-train/local-queue")
    assert localqueue.queue_dir({"HOME": "/h"}) == Path("/h/.local/state/knl-train/local-queue")


def test_a_record_is_the_job_and_only_its_owner_reads_it(tmp_path, queue, env):
    script = job_script(tmp_path / "p", "echo hi", name="st_n1", token="knl:u:n1", limit="00:02:30")
    job_id = queue.enqueue("job.sh", cwd=script.parent, env={**env, "SECRET": "s3", "LOCAL_JOB_ID": "9"})
    job = queue.load(job_id)
    assert (job_id, job["name"], job["token"], job["time_limit"], job["state"], job["after"]) == \
        (1, "st_n1", "knl:u:n1", 150, "pending", None)
    assert (job["script"], job["cwd"], job["output"]) == (str(script), str(script.parent),
                                                           str(script.parent / "local-1.out"))
    # The environment is what the job will run with (sbatch --export=ALL), less the id it gets.
    assert job["env"]["SECRET"] == "s3" and "LOCAL_JOB_ID" not in job["env"]
    assert (mode(queue.path), mode(queue.jobs_dir), mode(queue.jobs_dir / "1.json")) == (0o700, 0o700, 0o600)
    # Without --time there is no limit; ids are never reused, even without the counter.
    plain = job_script(tmp_path / "q", "true")
    assert queue.enqueue(plain, cwd=tmp_path, env=env) == 2 and queue.load(2)["time_limit"] is None
    (queue.path / "next-id").unlink()
    assert queue.enqueue(plain, cwd=tmp_path, env=env) == 3


def test_enqueue_refuses_what_it_cannot_run(tmp_path, queue, env):
    good = job_script(tmp_path / "a", "true")
    with pytest.raises(UserError, match="job 99 is not in the local queue"):
        queue.enqueue(good, cwd=tmp_path, env=env, after=99)
    with pytest.raises(UserError, match="cannot read the job script"):
        queue.enqueue("missing.sh", cwd=tmp_path, env=env)
    bad = job_script(tmp_path / "b", "true", limit="1:00:00:00")
    with pytest.raises(UserError, match=rf"^{bad}: --time=1:00:00:00 is not a time limit: write HH:MM:SS"):
        queue.enqueue(bad, cwd=tmp_path, env=env)
    assert queue.jobs() == []


@pytest.mark.parametrize("text, seconds", [
    ("00:30:00", 1800), ("0:02", 2), ("45", 2700), ("1:30", 90), ("1-00", 86400),
    ("1-2:3", 93780), ("2-03:04:05", 183845), ("100:00:00", 360000), (" 00:00:01 ", 1)])
def test_time_limit_reads_a_time_as_slurm_does(text, seconds):
    assert time_limit(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("1:00:00:00", "is not a time limit"), ("01:60:00", "is not a time limit"),
    ("1-24", "is not a time limit"), ("10 + 5", "is not a time limit"), ("", "is not a time limit"),
    ("UNLIMITED", "is not a time limit"), ("0", "is zero"), ("00:00:00", "is zero")])
def test_time_limit_refuses_what_is_not_one(text, message):
    with pytest.raises(UserError, match=f"^{re.escape(f'--time={text} {message}')}"):
        time_limit(text)


def test_directives_are_read_before_the_first_command():
    text = "#!/bin/bash\n#LOCAL --job-name=st_n1\n#LOCAL --comment=knl:u:n1 --time=00:05:00\nset -u\n"
    assert localqueue.directives(text + "#LOCAL --job-name=late\n") == {
        "job-name": "st_n1", "comment": "knl:u:n1", "time": "00:05:00"}
    assert localqueue.directives("#!/bin/bash\n#LOCAL --job-name a --comment b\n") == {"job-name": "a", "comment": "b"}
    assert localqueue.options(["--job-name", "--time=1"]) == [("job-name", None), ("time", "1")]


def test_a_started_or_cancelled_job_keeps_no_environment(tmp_path, queue, env):
    for d in ("a", "b"):
        queue.enqueue(job_script(tmp_path / d, "true"), cwd=tmp_path, env={**env, "SECRET": "s3"})
    what, job = queue.claim_next((1, "runner"))
    assert (what, job["id"], job["state"], job["env"]["SECRET"]) == ("run", 1, "running", "s3")
    assert "env" not in queue.load(1) and queue.load(1)["state"] == "running"
    assert queue.cancel(2) == "cancelled"
    assert "env" not in queue.load(2) and queue.load(2)["state"] == "cancelled"
    assert mode(queue.jobs_dir / "2.json") == 0o600


def test_a_job_left_running_by_a_dead_runner_holds_back_the_rest(tmp_path, queue, env):
    a = queue.enqueue(job_script(tmp_path / "a", "true"), cwd=tmp_path, env=env)
    b = queue.enqueue(job_script(tmp_path / "b", "true"), cwd=tmp_path, env=env, after=a)
    me = os.getpid()
    # Job a "runs" as this test's process; the runner that claimed it is gone (a stale start time).
    queue.update(a, state="running", runner_pid=me, runner_start="0", pid=me, pid_start=proc_start(me))
    assert queue.claim_next((1, "new-runner")) == ("wait", None)
    assert queue.load(b)["state"] == "pending"
    queue.update(a, pid_start="0")  # now its process is gone too
    what, job = queue.claim_next((1, "new-runner"))
    assert (what, job["id"], job["runner_pid"], job["runner_start"]) == ("run", b, 1, "new-runner")
    assert queue.load(a)["state"] == "lost" and "died" in queue.load(a)["reason"]


def test_after_a_job_that_timed_out_the_next_one_runs(tmp_path, queue, env):
    a = queue.enqueue(job_script(tmp_path / "a", "true"), cwd=tmp_path, env=env)
    b = queue.enqueue(job_script(tmp_path / "b", "true"), cwd=tmp_path, env=env, after=a)
    queue.update(a, state="timeout", exit_code=143, end=localqueue.now())
    assert queue.claim_next((1, "r"))[1]["id"] == b
    assert queue.cancel(a) == "already timeout"


def test_cancel_a_job_that_just_ended_leaves_its_runner_to_record_it(tmp_path, queue, env):
    """Its process is gone, its runner lives (about to record the exit code): not "cancelled"."""
    queue.enqueue(job_script(tmp_path / "a", "true"), cwd=tmp_path, env=env)
    me, start = os.getpid(), proc_start(os.getpid())
    queue.update(1, state="running", runner_pid=me, runner_start=start, pid=me, pid_start="0")
    assert queue.cancel(1) == "already ended"
    assert (queue.load(1)["state"], queue.load(1)["cancel_requested"]) == ("running", False)


def days_ago(days: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_submit_forgets_jobs_that_ended_over_30_days_ago(tmp_path, queue, env):
    script = job_script(tmp_path / "a", "true")
    for _ in range(6):
        queue.enqueue(script, cwd=tmp_path, env={**env, "SECRET": "s3"})
    queue.update(1, state="completed", end=days_ago(31))
    queue.update(2, state="lost", end=days_ago(40))
    queue.update(3, state="timeout", end=days_ago(29))  # an older runner left its environment
    queue.update(4, state="failed", end="not a time")   # kept: its age is unknown
    queue.update(5, state="running", start=days_ago(45), end=None)
    assert localqueue.KEEP_DAYS == 30
    assert queue.enqueue(script, cwd=tmp_path, env=env) == 7
    assert [j["id"] for j in queue.jobs()] == [3, 4, 5, 6, 7]
    assert ["env" in queue.load(i) for i in (3, 4, 5, 6)] == [False, False, True, True]
    assert queue.prune(keep_days=0) == [3]
    assert [j["id"] for j in queue.jobs()] == [4, 5, 6, 7]
