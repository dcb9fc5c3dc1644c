"""The local scheduler's runner (knl_train/studies/localrunner.py): order, environment, --after,
the exit race, cancel, the time limit (SIGTERM, the grace period, SIGKILL), and the detached runner.

Every test has its own queue (XDG_STATE_HOME under tmp_path). The runner runs in the foreground
(``run_queue``) except where detaching is the point; a test asserts on the records once it has
returned. Waits poll with a deadline; the jobs' own ``sleep 60`` is the work a limit cuts short.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from knl_train.studies import localqueue, localrunner
from knl_train.studies.localqueue import Queue, proc_start
from knl_train.studies.localrunner import run_queue
from knl_train.studies.schedulers import JobState
from knl_train.studies.schedulers.local import job_state
from tests.support.localqueue import job_script, quiet, until



def test_jobs_run_in_id_order_with_the_submitters_environment(tmp_path, queue, env):
    ids = []
    for k in range(3):
        script = job_script(tmp_path / f"p{k}", 'echo "$LOCAL_JOB_ID $MY_VAR $(pwd)" >> ../order.txt\n'
                                                'echo "out of $LOCAL_JOB_ID"', limit="1:00" if k == 1 else None)
        ids.append(queue.enqueue(script.name, cwd=script.parent, env={**env, "MY_VAR": f"v{k}"}))
    assert ids == [1, 2, 3]
    log = []
    assert run_queue(queue, echo=log.append) == [1, 2, 3]
    assert (tmp_path / "order.txt").read_text().splitlines() == [
        f"{i} v{k} {tmp_path / f'p{k}'}" for k, i in enumerate(ids)]
    for k, i in enumerate(ids):
        job = queue.load(i)
        assert (job["state"], job["exit_code"], job["name"], job["token"]) == ("completed", 0, "pt", "tok-1")
        assert job["output"] == str(tmp_path / f"p{k}" / f"local-{i}.out")
        assert Path(job["output"]).read_text() == f"out of {i}\n"
        assert job["start"] <= job["end"] and "env" not in job
    assert len(log) == 6 and "job 3: completed (exit 0)" in log[-1]
    assert log[2].endswith(f"job 2: bash {tmp_path / 'p1' / 'job.sh'} in {tmp_path / 'p1'}, time limit 00:01:00")


def test_after_waits_for_the_job_to_end_in_any_state(tmp_path, queue, env):
    first = queue.enqueue(job_script(tmp_path / "a", "exit 3"), cwd=tmp_path, env=env)
    second = queue.enqueue(job_script(tmp_path / "b", "echo ran"), cwd=tmp_path, env=env, after=first)
    assert job_state(queue.load(second)).reason == "waiting for job 1"
    assert run_queue(queue, echo=quiet) == [1, 2]
    assert (queue.load(1)["state"], queue.load(1)["exit_code"]) == ("failed", 3)
    assert (queue.load(2)["state"], queue.load(2)["after"]) == ("completed", 1)


def test_a_job_queued_as_the_runner_finds_nothing_still_runs(tmp_path, queue, env, monkeypatch):
    """The exit race: a submit queues a job after the runner's last scan, finds the runner lock
    held, and leaves the job to that runner, which must then run it rather than exit."""
    first = queue.enqueue(job_script(tmp_path / "a", "true"), cwd=tmp_path, env=env)
    claim, seen = queue.claim_next, []

    def claim_then_submit(me):
        what, job = claim(me)
        if what == "idle" and not seen:
            seen.append(queue.enqueue(job_script(tmp_path / "b", "echo late"), cwd=tmp_path, env=env))
            seen.append(queue.try_runner_lock())  # what the submit sees: held, so it starts none
        return what, job

    monkeypatch.setattr(queue, "claim_next", claim_then_submit)
    assert run_queue(queue, echo=quiet) == [first, 2]
    assert seen == [2, None]
    assert queue.load(2)["state"] == "completed"
    assert (tmp_path / "b" / "local-2.out").read_text() == "late\n"
    fd = queue.try_runner_lock()  # released on exit
    assert fd is not None
    os.close(fd)


def test_a_runner_does_nothing_while_another_holds_the_queue(tmp_path, queue, env):
    queue.enqueue(job_script(tmp_path / "a", "true"), cwd=tmp_path, env=env)
    fd = queue.try_runner_lock()
    try:
        assert queue.try_runner_lock() is None
        assert run_queue(queue, echo=quiet) == []
        assert queue.load(1)["state"] == "pending"
    finally:
        os.close(fd)


def test_cancel_a_running_job(tmp_path, queue, env):
    queue.enqueue(job_script(tmp_path / "a", "echo started\nsleep 60\necho not reached"), cwd=tmp_path, env=env)
    runner = threading.Thread(target=run_queue, args=(queue,), kwargs={"echo": quiet})
    runner.start()
    try:
        until(lambda: (queue.load(1)["pid"] and "started" in (tmp_path / "a" / "local-1.out").read_text()))
        assert job_state(queue.load(1)).state == "running"
        assert queue.cancel(1) == "signalled (SIGTERM)"
    finally:
        runner.join(timeout=60)
    assert not runner.is_alive()
    job = queue.load(1)
    assert (job["state"], job["exit_code"], job["reason"]) == ("cancelled", 143, "cancelled while it ran")
    assert (tmp_path / "a" / "local-1.out").read_text() == "started\n"


# ---- the time limit ------------------------------------------------------------------------------
def test_a_job_at_its_limit_gets_sigterm_and_ends_in_timeout(tmp_path, queue, env):
    """As knl-train train does: on SIGTERM the job saves its state and exits 143, in the grace
    period; the next job then runs."""
    body = "trap 'echo checkpointed; exit 143' TERM\necho started\nsleep 60\necho not reached"
    queue.enqueue(job_script(tmp_path / "a", body, limit="0:02"), cwd=tmp_path, env=env)
    queue.enqueue(job_script(tmp_path / "b", "echo next"), cwd=tmp_path, env=env, after=1)
    log, t0 = [], time.monotonic()
    assert run_queue(queue, grace=30, echo=log.append) == [1, 2]
    assert time.monotonic() - t0 < 30  # neither the sleep nor the grace period waited out
    job = queue.load(1)
    assert (job["state"], job["exit_code"], job["time_limit"]) == ("timeout", 143, 2)
    assert job["reason"] == "reached its time limit (00:00:02)"
    out = (tmp_path / "a" / "local-1.out").read_text().splitlines()  # bash adds "... Terminated sleep 60"
    assert (out[0], out[-1], "not reached" in out) == ("started", "checkpointed", False)
    assert job_state(job) == JobState("timeout", exit_code=143, reason="reached its time limit (00:00:02)",
                                      source="local")
    assert [line.split(" ", 1)[1] for line in log[1:3]] == [
        "job 1: time limit reached: SIGTERM to its processes, SIGKILL in 30 s if any is left",
        "job 1: timeout (exit 143)"]
    assert queue.load(2)["state"] == "completed"


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path, queue, env):
    body = "trap '' TERM\necho started\nsleep 60\necho not reached"
    queue.enqueue(job_script(tmp_path / "a", body, limit="0:01"), cwd=tmp_path, env=env)
    log = []
    assert run_queue(queue, grace=0.5, echo=log.append) == [1]
    job = queue.load(1)
    assert (job["state"], job["exit_code"]) == ("timeout", 137)
    assert (tmp_path / "a" / "local-1.out").read_text() == "started\n"
    assert [line.split(" ", 1)[1] for line in log[1:]] == [
        "job 1: time limit reached: SIGTERM to its processes, SIGKILL in 0.5 s if any is left",
        "job 1: SIGKILL to what was left of it", "job 1: timeout (exit 137)"]


def test_what_a_timed_out_job_leaves_behind_is_killed_before_the_next_job(tmp_path, queue, env):
    """The script exits on SIGTERM, a process of it ignores SIGTERM: SIGKILL after the grace
    period, so the next job never runs beside it."""
    body = "(trap '' TERM; exec sleep 60) &\necho $! > \"$(dirname \"$0\")/straggler.pid\"\necho started\nwait"
    queue.enqueue(job_script(tmp_path / "a", body, limit="0:01"), cwd=tmp_path, env=env)
    queue.enqueue(job_script(tmp_path / "b", "echo next"), cwd=tmp_path, env=env)
    log = []
    assert run_queue(queue, grace=0.5, echo=log.append) == [1, 2]
    assert (queue.load(1)["state"], queue.load(1)["exit_code"]) == ("timeout", 143)
    assert "job 1: SIGKILL to what was left of it" in [line.split(" ", 1)[1] for line in log]
    straggler = int((tmp_path / "a" / "straggler.pid").read_text())
    until(lambda: proc_start(straggler) is None, timeout=10)  # killed; its new parent reaps it


def test_a_job_under_its_limit_is_left_alone(tmp_path, queue, env):
    queue.enqueue(job_script(tmp_path / "a", "echo quick", limit="00:10:00"), cwd=tmp_path, env=env)
    log = []
    assert run_queue(queue, grace=0.5, echo=log.append) == [1]
    assert (queue.load(1)["state"], queue.load(1)["exit_code"], queue.load(1)["reason"]) == ("completed", 0, "")
    assert not any("SIG" in line for line in log)


def test_a_cancel_wins_over_the_limit(tmp_path, queue, env):
    queue.enqueue(job_script(tmp_path / "a", "true", limit="0:01"), cwd=tmp_path, env=env)
    queue.update(1, cancel_requested=True)
    assert localrunner.ending(queue.load(1), 143, timed_out=True) == ("cancelled", "cancelled while it ran")
    queue.update(1, cancel_requested=False)
    assert localrunner.ending(queue.load(1), 0, timed_out=True) == ("timeout", "reached its time limit (00:00:01)")
    assert localrunner.ending(queue.load(1), 2, timed_out=False) == ("failed", "")


# ---- the detached runner ---------------------------------------------------------------------------
def test_a_runner_started_for_a_queue_runs_that_queue(tmp_path, env):
    """status(env=...) may look at another queue than its process's own environment names:
    the runner it starts must work the queue it looked at."""
    other = Queue(tmp_path / "elsewhere" / "queue").prepare()
    assert other.path != localqueue.queue_dir(os.environ)
    other.enqueue(job_script(tmp_path / "a", "echo ran"), cwd=tmp_path, env=env)
    proc = localrunner.spawn_runner(other)
    assert proc.args[1:4] == ["-m", "knl_train.studies.localrunner", "--queue"]
    proc.wait(timeout=120)
    assert other.load(1)["state"] == "completed"
    assert (tmp_path / "a" / "local-1.out").read_text() == "ran\n"
    assert "job 1: completed (exit 0)" in (other.path / "runner.log").read_text()
    assert not localqueue.queue_dir(os.environ).exists()
