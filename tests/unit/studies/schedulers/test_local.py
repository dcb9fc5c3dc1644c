"""The local backend (knl_train/studies/schedulers/local.py): status, find, cancel and list from
the command line, the checker, the site, the template, and a study rendered for it run end to
end by a detached runner. The queue and the runner have their own tests
(tests/unit/studies/test_localqueue.py, test_localrunner.py).

Every test has its own queue (XDG_STATE_HOME under tmp_path). The runner runs in the foreground
(``run_queue``) except where detaching is the point; waits poll a job record with a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from knl_train.studies import jobs, localrunner, render, schedulers, sites
from knl_train.studies import spec as study_spec
from knl_train.studies.localqueue import Queue, proc_start, queue_dir
from knl_train.studies.localrunner import run_queue
from knl_train.studies.manifest import Manifest
from knl_train.studies.schedulers import local
from knl_train.studies.schedulers.local import Local
from tests.support import ROOT
from tests.support.localqueue import job_script, quiet, until



def test_the_same_script_twice_runs_twice_and_find_names_the_first(tmp_path, queue, env):
    script = job_script(tmp_path / "p", 'echo "$LOCAL_JOB_ID" >> ran.txt', name="st_n1", token="knl:u:n1")
    assert [queue.enqueue(script, cwd=script.parent, env=env) for _ in range(2)] == [1, 2]
    backend = Local(revive=False)
    assert backend.find("st_n1", "knl:u:n1", env=env) == "1"
    assert backend.find("st_n1", "knl:u:n2", env=env) is None
    assert backend.find("other", "knl:u:n1", env=env) is None
    # A retried point's earlier job does not count: the next one does.
    assert backend.find("st_n1", "knl:u:n1", env=env, exclude=("1",)) == "2"
    assert run_queue(queue, echo=quiet) == [1, 2]
    assert (script.parent / "ran.txt").read_text() == "1\n2\n"


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
    monkeypatch.setattr(localrunner, "spawn_runner", started.append)
    queue.enqueue(job_script(tmp_path / "a", "true"), cwd=tmp_path, env=env)
    assert Local().status(["1"], env=env)["1"].state == "pending"
    assert [q.path for q in started] == [queue.path]
    fd = queue.try_runner_lock()  # a live runner holds the queue: it sees the job itself
    try:
        Local().status(["1"], env=env)
    finally:
        os.close(fd)
    assert len(started) == 1


def test_an_ended_orphan_is_known_by_its_own_record(tmp_path, queue, env):
    """A job whose runner and process are both gone (a reboot, kill -9): its job-<id>.json
    says how it ended, so `study status --wait` does not wait for it forever."""
    for d in ("a", "b", "c", "d"):
        queue.enqueue(job_script(tmp_path / d, "true"), cwd=tmp_path, env=env)
    me = os.getpid()
    for i in (1, 2, 3, 4):
        queue.update(i, state="running" if i < 4 else "lost", runner_pid=me, runner_start="0",
                     pid=me, pid_start="0")
    (tmp_path / "a" / "job-1.json").write_text('{"job_id": "1", "state": "finished", "exit_code": 0, '
                                               '"end": "2026-01-01T00:00:00Z"}\n')
    (tmp_path / "b" / "job-2.json").write_text('{"job_id": "2", "state": "finished", "exit_code": 3}\n')
    (tmp_path / "c" / "job-3.json").write_text('{"job_id": "3", "state": "started", "exit_code": null}\n')
    (tmp_path / "d" / "job-4.json").write_text('{"job_id": "4", "state": "started", "exit_code": null}\n')
    got = Local(revive=False).status(["1", "2", "3", "4"], env=env)
    assert {i: (s.state, s.exit_code) for i, s in got.items()} == {
        "1": ("completed", 0), "2": ("failed", 3), "3": ("failed", None), "4": ("failed", None)}
    assert got["1"].reason == f"its runner (pid {me}) died while it ran; ended 2026-01-01T00:00:00Z (its own record)"
    assert got["3"].reason == f"its runner (pid {me}) died while it ran, and was killed before it recorded its end"
    # No pid recorded (the runner died while starting it): it may still run, so it stays unknown.
    queue.update(3, pid=None, pid_start=None)
    assert Local(revive=False).status(["3"], env=env)["3"].state == "unknown"


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
    queue = Queue(queue_dir(env))
    until(lambda: queue.load(1)["state"] == "completed")
    assert (script.parent / "local-1.out").read_text() == f"job 1 in {script.parent}\n"
    assert queue.load(1)["runner_pid"] != os.getpid()
    fd = until(queue.try_runner_lock)  # the runner exits once the queue is empty
    os.close(fd)
    assert "job 1: completed (exit 0)" in (queue.path / "runner.log").read_text()


GOOD = ("#!/bin/bash\n#LOCAL --job-name=st_n1\n#LOCAL --comment=knl:u:n1\n#LOCAL --time=00:30:00\nset -u\n"
        "\"$KT\" launch -np 2 -- x\n")


@pytest.mark.parametrize("text, rules", [
    ("#LOCAL --job-name=a\necho hi\n", ["[shebang] line 1"]),
    ("#!/bin/bash\n#LOCAL --job-name=a\n#SBATCH --nodes=1\necho\n", ["[no-sbatch] line 3"]),
    ("#!/bin/bash\n#LOCAL --job-name=a\n#PBS -N a\necho\n", ["[no-pbs] line 3"]),
    ("#!/bin/bash\n#LOCAL --job-name=a --mem=1G\necho\n",
     ["[local-option] line 2: unknown #LOCAL option --mem; known: --job-name, --comment, --time"]),
    ("#!/bin/bash\n#LOCAL --job-name=a --time=1:00:00:00\necho\n",
     ["[local-time] line 2: --time=1:00:00:00 is not a time limit: write HH:MM:SS"]),
    ("#!/bin/bash\n#LOCAL --job-name=a\n#LOCAL --time 00:00:00\necho\n",
     ["[local-time] line 3: --time=00:00:00 is zero"]),
    ("#!/bin/bash\n#LOCAL --job-name=a --time\necho\n", ["[local-option] line 2: --time needs a value"]),
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


def test_detect():
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


def local_study(tmp_path: Path):
    """A one-point study rendered for the local site, with a knl-train stand-in: (study dir, fake)."""
    fake = tmp_path / "bin" / "knl-train"
    fake.parent.mkdir()
    fake.write_text(FAKE_KT)
    fake.chmod(0o755)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "loc", "site": "local", "nodes": [1], "ranks_per_node": 1, "scaling": "weak",
        "train": {"config": str(ROOT / "tests" / "fixtures" / "studies" / "tiny.yaml")}, "steps": 4}))
    return render.write(render.render(study_spec.load(spec), command=str(fake)), tmp_path / "study"), fake


def test_a_local_study_runs_once_through_knl_train_launch(tmp_path, env):
    out, fake = local_study(tmp_path)
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
    queue = Queue(queue_dir(env))
    assert [j["id"] for j in queue.jobs()] == [1]
    assert queue.load(1)["token"] == p.token and queue.load(1)["name"] == p.job_name
    # The spec's walltime (the default, 00:30:00) is the job's limit.
    assert "#LOCAL --time=00:30:00\n" in (out / p.script).read_text()
    assert queue.load(1)["time_limit"] == 1800
    os.close(until(queue.try_runner_lock))


def test_a_rendered_script_run_by_hand_is_job_manual(tmp_path, env):
    """`bash points/<id>/job.sh` outside the queue (set -u is on, LOCAL_JOB_ID unset) runs the
    point and keeps its record as job-manual.json."""
    out, fake = local_study(tmp_path)
    p = Manifest.load(out).points[0]
    env.pop("LOCAL_JOB_ID", None)
    proc = subprocess.run(["bash", str(out / p.script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "repeat 0, job manual on 1 node(s)" in proc.stdout
    record = yaml.safe_load((out / p.script).parent.joinpath("job-manual.json").read_text())
    assert (record["state"], record["exit_code"], record["job_id"]) == ("finished", 0, "manual")
    assert (fake.parent / "calls.log").read_text().startswith(f"launch -np {p.ranks} ")
    assert not queue_dir(env).exists()


def test_list_and_submit_from_the_command_line(tmp_path, queue, env, capsys):
    queue.enqueue(job_script(tmp_path / "a", "true", name="st_a", limit="0:02"), cwd=tmp_path, env=env)
    queue.update(1, state="timeout", exit_code=143, end=queue.load(1)["submitted"],
                 reason="reached its time limit (00:00:02)")
    assert Local(revive=False).status(["1"], env=env) == {"1": schedulers.JobState(
        "timeout", exit_code=143, reason="reached its time limit (00:00:02)", source="local")}
    assert local.main(["list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["id", "state", "exit", "submitted", "limit", "name", "script"]
    assert row.split() == ["1", "timeout", "143", queue.load(1)["submitted"], "00:00:02", "st_a",
                           str(tmp_path / "a" / "job.sh")]
    bad = job_script(tmp_path / "b", "true", limit="soon")
    assert local.main(["submit", str(bad)]) == 1
    assert capsys.readouterr().err == f"local submit: {bad}: --time=soon is not a time limit: write HH:MM:SS " \
                                      "(or MM, MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)\n"
    assert [j["id"] for j in queue.jobs()] == [1]
