"""The local backend (knl_train/studies/schedulers/local.py): the queue, the runner, status, cancel,
the checker, the site, and a study rendered for it run end to end by a detached runner.

Every test has its own queue (XDG_STATE_HOME under tmp_path). The runner runs in the foreground
(``run_queue``) except where detaching is the point; waits poll a job record with a deadline.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from knl_train.errors import UserError
from knl_train.studies import jobs, render, schedulers, sites
from knl_train.studies import spec as study_spec
from knl_train.studies.manifest import Manifest
from knl_train.studies.schedulers import local
from knl_train.studies.schedulers.local import Local, Queue, job_state, proc_start, run_queue
from tests.support import ROOT


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """The submitter's environment, with a queue of this test's own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return dict(os.environ)


@pytest.fixture()
def queue(env):
    return Queue(local.queue_dir(env)).prepare()


def job_script(directory: Path, body: str, name: str = "pt", token: str = "tok-1") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "job.sh"
    path.write_text(f"#!/bin/bash\n#LOCAL --job-name={name}\n#LOCAL --comment={token}\n{body}\n")
    return path


def until(predicate, timeout: float = 60.0):
    """Poll ``predicate`` until it holds (its value), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.05)


def quiet(line):
    pass


# ---- the queue and the runner ------------------------------------------------------------------------
def test_queue_dir_follows_xdg_state_home():
    assert local.queue_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == Path("/s/knl-train/local-queue")
    # The XDG spec: a relative XDG_STATE_HOME is invalid and ignored.
    assert local.queue_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == \
        Path("/h/.local/state/knl-train/local-queue")
    assert local.queue_dir({"HOME": "/h"}) == Path("/h/.local/state/knl-train/local-queue")


def test_jobs_run_in_id_order_with_the_submitters_environment(tmp_path, queue, env):
    ids = []
    for k in range(3):
        script = job_script(tmp_path / f"p{k}", 'echo "$LOCAL_JOB_ID $MY_VAR $(pwd)" >> ../order.txt\n'
                                                'echo "out of $LOCAL_JOB_ID"')
        ids.append(queue.enqueue(script.name, cwd=script.parent, env={**env, "MY_VAR": f"v{k}"}))
    assert ids == [1, 2, 3]
    assert (queue.path.stat().st_mode & 0o777) == 0o700  # the records hold environments
    log = []
    assert run_queue(queue, echo=log.append) == [1, 2, 3]
    assert (tmp_path / "order.txt").read_text().splitlines() == [
        f"{i} v{k} {tmp_path / f'p{k}'}" for k, i in enumerate(ids)]
    for k, i in enumerate(ids):
        job = queue.load(i)
        assert (job["state"], job["exit_code"], job["name"], job["token"]) == ("completed", 0, "pt", "tok-1")
        assert job["output"] == str(tmp_path / f"p{k}" / f"local-{i}.out")
        assert Path(job["output"]).read_text() == f"out of {i}\n"
        assert job["start"] <= job["end"]
    assert len(log) == 6 and "job 3: completed (exit 0)" in log[-1]
    # Ids are never reused, even without the counter.
    (queue.path / "next-id").unlink()
    assert queue.enqueue(tmp_path / "p0" / "job.sh", cwd=tmp_path, env=env) == 4


def test_after_waits_for_the_job_to_end_in_any_state(tmp_path, queue, env):
    first = queue.enqueue(job_script(tmp_path / "a", "exit 3"), cwd=tmp_path, env=env)
    second = queue.enqueue(job_script(tmp_path / "b", "echo ran"), cwd=tmp_path, env=env, after=first)
    assert job_state(queue.load(second)).reason == "waiting for job 1"
    assert run_queue(queue, echo=quiet) == [1, 2]
    assert (queue.load(1)["state"], queue.load(1)["exit_code"]) == ("failed", 3)
    assert (queue.load(2)["state"], queue.load(2)["after"]) == ("completed", 1)
    with pytest.raises(UserError, match="job 99 is not in the local queue"):
        queue.enqueue(tmp_path / "b" / "job.sh", cwd=tmp_path, env=env, after=99)
    with pytest.raises(UserError, match="cannot read the job script"):
        queue.enqueue("missing.sh", cwd=tmp_path, env=env)


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
    assert job_state(queue.load(a)).state == "unknown"


def test_the_same_script_twice_runs_twice_and_find_names_the_first(tmp_path, queue, env):
    script = job_script(tmp_path / "p", 'echo "$LOCAL_JOB_ID" >> ran.txt', name="st_n1", token="knl:u:n1")
    assert [queue.enqueue(script, cwd=script.parent, env=env) for _ in range(2)] == [1, 2]
    backend = Local(revive=False)
    assert backend.find("st_n1", "knl:u:n1", env=env) == "1"
    assert backend.find("st_n1", "knl:u:n2", env=env) is None
    assert backend.find("other", "knl:u:n1", env=env) is None
    assert run_queue(queue, echo=quiet) == [1, 2]
    assert (script.parent / "ran.txt").read_text() == "1\n2\n"


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


# ---- cancel and status --------------------------------------------------------------------------------
def test_cancel_a_pending_job(tmp_path, queue, env, capsys):
    for d in ("a", "b"):
        queue.enqueue(job_script(tmp_path / d, "echo ran"), cwd=tmp_path, env=env)
    assert queue.cancel(1) == "cancelled"
    assert queue.cancel(1) == "already cancelled"
    assert run_queue(queue, echo=quiet) == [2]
    assert not (tmp_path / "a" / "local-1.out").exists()
    assert Local(revive=False).status(["1", "2"], env=env) == {
        "1": schedulers.JobState("cancelled", reason="cancelled before it started", source="local"),
        "2": schedulers.JobState("completed", exit_code=0, reason=f"ended {queue.load(2)['end']}",
                                 source="local")}
    assert local.main(["cancel", "2", "42"]) == 1
    assert capsys.readouterr().out.splitlines() == ["job 2: already completed", "job 42: unknown"]


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


def test_status_of_a_job_whose_runner_died(tmp_path, queue, env):
    for d in ("a", "b", "c"):
        queue.enqueue(job_script(tmp_path / d, "true"), cwd=tmp_path, env=env)
    me, start = os.getpid(), proc_start(os.getpid())
    queue.update(1, state="running", runner_pid=me, runner_start="0", pid=me, pid_start="0")
    queue.update(2, state="running", runner_pid=me, runner_start="0", pid=me, pid_start=start)
    queue.update(3, state="running", runner_pid=me, runner_start=start, pid=me, pid_start=start)
    got = Local(revive=False).status(["1", "2", "3", "99", "x"], env=env)
    assert {i: s.state for i, s in got.items()} == {
        "1": "unknown", "2": "running", "3": "running", "99": "unknown", "x": "unknown"}
    assert got["1"].reason == (f"its runner (pid {me}) died while it ran; the job's own record "
                               "tells how it ended")
    assert got["2"].reason == f"its runner (pid {me}) died; the job still runs"
    assert got["99"].reason == "not in the local queue"
    assert {s.source for s in got.values()} == {"local"}
    # Cancelling a job nobody runs any more records it; one being started is killed once it starts.
    assert queue.cancel(1) == "cancelled"
    assert (queue.load(1)["state"], queue.load(1)["reason"]) == ("cancelled", "cancelled after its runner died")
    queue.update(3, pid=None, pid_start=None)
    assert queue.cancel(3) == "cancel requested (it is starting)"
    assert (queue.load(3)["state"], queue.load(3)["cancel_requested"]) == ("running", True)


def test_status_restarts_a_runner_for_pending_jobs(tmp_path, queue, env, monkeypatch):
    started = []
    monkeypatch.setattr(local, "spawn_runner", started.append)
    queue.enqueue(job_script(tmp_path / "a", "true"), cwd=tmp_path, env=env)
    assert Local().status(["1"], env=env)["1"].state == "pending"
    assert [q.path for q in started] == [queue.path]
    fd = queue.try_runner_lock()  # a live runner holds the queue: it sees the job itself
    try:
        Local().status(["1"], env=env)
    finally:
        os.close(fd)
    assert len(started) == 1


# ---- the backend's interface ------------------------------------------------------------------------
def test_submit_argv_and_job_id():
    backend = schedulers.get("local")
    assert isinstance(backend, Local) and backend.script_name == "job.sh"
    assert backend.submit_argv(Path("/s/job.sh"), "7") == [
        sys.executable, "-m", "knl_train.studies.schedulers.local", "submit", "/s/job.sh", "--after", "7"]
    assert backend.submit_argv(Path("/s/job.sh"), None)[-1] == "/s/job.sh"
    assert backend.parse_job_id("warning: x\nSubmitted local job 12\n") == "12"
    assert backend.parse_job_id("Submitted batch job 12\n") is None


def test_submit_returns_at_once_and_a_detached_runner_runs_the_job(tmp_path, env):
    script = job_script(tmp_path / "p", 'echo "job $LOCAL_JOB_ID in $(pwd)"')
    assert Local().submit(script, cwd=script.parent, env=env) == "1"
    queue = Queue(local.queue_dir(env))
    until(lambda: queue.load(1)["state"] == "completed")
    assert (script.parent / "local-1.out").read_text() == f"job 1 in {script.parent}\n"
    assert queue.load(1)["runner_pid"] != os.getpid()
    fd = until(queue.try_runner_lock)  # the runner exits once the queue is empty
    os.close(fd)
    assert "job 1: completed (exit 0)" in (queue.path / "runner.log").read_text()


GOOD = "#!/bin/bash\n#LOCAL --job-name=st_n1\n#LOCAL --comment=knl:u:n1\nset -u\n\"$KT\" launch -np 2 -- x\n"


@pytest.mark.parametrize("text, rules", [
    ("#LOCAL --job-name=a\necho hi\n", ["[shebang] line 1"]),
    ("#!/bin/bash\n#LOCAL --job-name=a\n#SBATCH --nodes=1\necho\n", ["[no-sbatch] line 3"]),
    ("#!/bin/bash\n#LOCAL --job-name=a\n#PBS -N a\necho\n", ["[no-pbs] line 3"]),
    ("#!/bin/bash\n#LOCAL --job-name=a --time=1:00\necho\n",
     ["[local-option] line 2: unknown #LOCAL option --time"]),
    ("#!/bin/bash\n#LOCAL --job-name\necho\n",
     ["[local-option] line 2: --job-name needs a value", "[job-name] no #LOCAL --job-name"]),
    ("#!/bin/bash\n#LOCAL --comment=t\necho\n", ["[job-name] no #LOCAL --job-name"]),
    ("#!/bin/bash\n#LOCAL --job-name=a\necho\n#LOCAL --comment=t\n", ["[directives-first] line 4"]),
    ("#!/bin/bash\n#LOCAL --job-name=a\nexec srun -n 2 \\\n  x\n", ["[no-srun] line 3"]),
])
def test_check_names_each_problem(text, rules):
    assert Local().check(GOOD) == []
    problems = Local().check(text)
    assert len(problems) == len(rules), problems
    for problem, rule in zip(problems, rules):
        assert problem.startswith(rule), problems


def test_directives_and_detect():
    assert local.directives(GOOD + "#LOCAL --job-name=late\n") == {"job-name": "st_n1", "comment": "knl:u:n1"}
    assert local.directives("#!/bin/bash\n#LOCAL --job-name a --comment b\n") == {"job-name": "a", "comment": "b"}
    assert schedulers.detect(GOOD) == "local"
    assert schedulers.detect("#!/bin/bash\n#SBATCH -N 1\n") == "slurm"


def test_local_site_loads():
    site = sites.load("local")
    assert (site.scheduler, site.launcher, site.preset, site.topology, site.exclusive) == \
        ("local", "mpirun", "auto", "detect", False)
    assert "local" in sites.names()


# ---- a study on the local site, end to end ------------------------------------------------------------
FAKE_KT = """#!/bin/bash
# knl-train stand-in: logs its arguments; `launch ... -- CMD` runs CMD.
echo "$*" >> "$(dirname "$0")/calls.log"
if [ "$1" = launch ]; then
    while [ "$1" != -- ]; do shift; done
    shift
    exec "$@"
fi
"""


def test_a_local_study_runs_once_through_knl_train_launch(tmp_path, env):
    fake = tmp_path / "bin" / "knl-train"
    fake.parent.mkdir()
    fake.write_text(FAKE_KT)
    fake.chmod(0o755)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "loc", "site": "local", "nodes": [1], "ranks_per_node": 1, "scaling": "weak",
        "train": {"config": str(ROOT / "tests" / "fixtures" / "studies" / "tiny.yaml")}, "steps": 4}))
    out = render.write(render.render(study_spec.load(spec), command=str(fake)), tmp_path / "study")
    said = []
    first = jobs.submit(out, env=env, echo=said.append)
    again = jobs.submit(out, env=env, echo=said.append)
    assert [(s.job_id, s.new) for s in first] == [("1", True)]
    assert [(s.job_id, s.new) for s in again] == [("1", False)]
    rows = jobs.wait(out, timeout=120, env=env)
    assert [(r.state, r.exit_code, r.source) for r in rows] == [("completed", 0, "local")]
    m = Manifest.load(out)
    p = m.points[0]
    calls = (fake.parent / "calls.log").read_text().splitlines()
    # The ranks start through knl-train launch (which adds knl-train exec itself), exactly once.
    assert len(calls) == 2 and "exec" not in calls[1].split()
    assert calls[0] == (f"launch -np {p.ranks} --preset {m.preset} --threads-per-rank {p.cores_per_rank} "
                        f"-- {fake} {calls[1]}")
    assert calls[1].startswith(f"train --config {out}/train.yaml --set per_rank_batch={p.per_rank_batch} "
                               "--set steps=4 --set log_every=")
    assert calls[1].endswith(f" --set run_dir={out}/{p.run_dirs[0]}")
    record = yaml.safe_load((out / p.script).parent.joinpath("job-1.json").read_text())
    assert (record["state"], record["exit_code"], record["job_id"]) == ("finished", 0, "1")
    queue = Queue(local.queue_dir(env))
    assert [j["id"] for j in queue.jobs()] == [1]
    assert queue.load(1)["token"] == p.token and queue.load(1)["name"] == p.job_name
    os.close(until(queue.try_runner_lock))
