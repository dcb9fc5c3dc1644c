"""The Slurm backend (knl_train/studies/schedulers/slurm.py) against FAKE sbatch, squeue and sacct
(tests/support/schedulers.py): the exact command lines, their parsing, and the script checker.
A real Slurm runs the study end to end in tests/system/test_studies_slurm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knl_train.errors import UserError
from knl_train.studies.schedulers import (JobState, LookupFailed, RetriesExhausted, TransientError,
                                         submit_with_retry)
from knl_train.studies.schedulers.slurm import Slurm
from tests.support.schedulers import SLURM_OK


def test_sbatch_parsable_with_cluster(fakes, job_script):
    fakes.add("sbatch", {"stdout": "123;cluster\n"})
    job_id = Slurm().submit(job_script, cwd=job_script.parent, env=fakes.env)
    assert job_id == "123"
    assert fakes.calls("sbatch") == [["sbatch", "--parsable", str(job_script)]]
    log = json.loads((fakes.bin / "calls.jsonl").read_text().splitlines()[0])
    assert log["cwd"] == str(job_script.parent)


def test_sbatch_dependency(fakes, job_script):
    fakes.add("sbatch", {"stdout": "124\n"})
    assert Slurm().submit(job_script, cwd=job_script.parent, after="123", env=fakes.env) == "124"
    assert fakes.calls("sbatch") == [
        ["sbatch", "--parsable", "--dependency=afterany:123", str(job_script)]]


def test_sbatch_transient_twice_then_success(fakes, job_script, capsys):
    busy = {"rc": 1, "stderr": "sbatch: error: Batch job submission failed: Socket timed out "
                                "on send/recv operation\n"}
    fakes.add("sbatch", busy, {"rc": 1, "stderr": "sbatch: error: Slurm temporarily unable to "
                                                  "accept job, sleeping and retrying\n"
                                                  "sbatch: error: Batch job submission failed: "
                                                  "Resource temporarily unavailable\n"},
              {"stdout": "125\n"})
    sleeps = []
    job_id = submit_with_retry(Slurm(), job_script, cwd=job_script.parent, env=fakes.env,
                               base_delay=2.0, sleep=sleeps.append)
    assert job_id == "125"
    assert len(fakes.calls("sbatch")) == 3
    assert sleeps == [2.0, 4.0]
    # Retries are logged as warnings (a message may run over several lines).
    logged = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("knl-train: warning: ")]
    assert len(logged) == 2 and "Socket timed out" in logged[0]
    assert all(line.startswith(f"knl-train: warning: sbatch {job_script}: ") for line in logged)


def test_sbatch_permanent_error(fakes, job_script):
    fakes.add("sbatch", {"rc": 1, "stderr": "sbatch: error: Batch job submission failed: "
                                            "Invalid account or account/partition "
                                            "combination specified\n"})
    sleeps = []
    with pytest.raises(UserError) as err:
        submit_with_retry(Slurm(), job_script, cwd=job_script.parent, env=fakes.env,
                          sleep=sleeps.append)
    assert "Invalid account or account/partition combination specified" in str(err.value)
    assert str(job_script) in str(err.value)
    assert sleeps == [] and len(fakes.calls("sbatch")) == 1


def test_sbatch_prints_no_job_id(fakes, job_script):
    fakes.add("sbatch", {"stdout": "Submitted batch job\n"})
    with pytest.raises(UserError, match="Submitted batch job"):
        Slurm().submit(job_script, cwd=job_script.parent, env=fakes.env)


def test_sbatch_not_installed(fakes, job_script):
    with pytest.raises(UserError, match="sbatch is not installed"):
        Slurm().submit(job_script, cwd=job_script.parent, env=fakes.env)


def test_submit_timeout_is_transient(fakes, job_script):
    fakes.add("sbatch", {"sleep": 5, "stdout": "1\n"})
    with pytest.raises(TransientError, match="did not answer"):
        Slurm(timeout=0.5).submit(job_script, cwd=job_script.parent, env=fakes.env)


# -- Slurm find / status ------------------------------------------------------------------------

SACCT_OFF = {"rc": 1, "stderr": "sacct: error: Slurm accounting storage is disabled\n"}
SACCT_ARGV = ["sacct", "-n", "-P", "-X", "--name=scal_n0001", "-S", "now-366days", "-E", "now",
              "-o", "JobID,Comment,WorkDir"]


def test_squeue_find_by_comment(fakes):
    fakes.add("squeue", {"stdout": "200|tok-a|/s/points/n1\n201_[0-3]|tok-b|/s/points/n1\n"})
    fakes.add("sacct", SACCT_OFF)
    slurm = Slurm()
    assert slurm.find("scal_n0001", "tok-b", env=fakes.env) == "201"
    assert fakes.calls() == [["squeue", "-h", "-t", "all", "--name=scal_n0001", "-o", "%i|%k|%Z"]]
    assert slurm.find("scal_n0001", "tok-z", env=fakes.env) is None
    # An earlier job of the point (a retry's) does not count.
    assert slurm.find("scal_n0001", "tok-b", env=fakes.env, exclude=("201",)) is None


def test_find_asks_sacct_after_squeue(fakes, tmp_path):
    # Aged out of squeue: sacct still has it; by comment, or by the point's directory where
    # accounting stores no comments.
    fakes.add("squeue", {"stdout": ""})
    fakes.add("sacct", {"stdout": "150|tok-a|/s/points/n1\n151||/s/points/n2\n152||/other\n"})
    slurm = Slurm()
    assert slurm.find("scal_n0001", "tok-a", env=fakes.env) == "150"
    assert fakes.calls() == [["squeue", "-h", "-t", "all", "--name=scal_n0001", "-o", "%i|%k|%Z"],
                             SACCT_ARGV]
    assert slurm.find("scal_n0001", "tok-x", env=fakes.env, workdir=Path("/s/points/n2")) == "151"
    assert slurm.find("scal_n0001", "tok-x", env=fakes.env, workdir=Path("/s/points/n3")) is None


def test_find_without_accounting_is_none_not_a_failure(fakes):
    fakes.add("squeue", {"stdout": "200|tok-a|/s\n"})
    fakes.add("sacct", SACCT_OFF)
    assert Slurm().find("scal_n0001", "tok-b", env=fakes.env) is None
    assert [c[0] for c in fakes.calls()] == ["squeue", "sacct"]
    # No sacct at all: the same.
    (fakes.bin / "sacct").unlink()
    assert Slurm().find("scal_n0001", "tok-b", env=fakes.env) is None


@pytest.mark.parametrize("squeue, sacct, words", [
    ({"rc": 1, "stderr": "squeue: error: Unable to contact slurm controller (connect failure)"}, None,
     "squeue failed (exit 1): squeue: error: Unable to contact slurm controller"),
    ({"sleep": 5}, None, "squeue could not be asked (squeue did not answer within 0.5 s"),
    ({"stdout": ""}, {"rc": 1, "stderr": "sacct: error: slurmdbd: Connection refused"},
     "sacct failed (exit 1): sacct: error: slurmdbd: Connection refused"),
])
def test_find_failure_is_a_lookup_failure(fakes, squeue, sacct, words):
    """Not being able to ask is not "no job": the caller must not submit again."""
    fakes.add("squeue", squeue)
    if sacct is not None:
        fakes.add("sacct", sacct)
    with pytest.raises(LookupFailed) as e:
        Slurm(timeout=0.5).find("scal_n0001", "tok", env=fakes.env)
    assert words in str(e.value)
    # squeue's failure stops the lookup: sacct is not asked in its place.
    assert [c[0] for c in fakes.calls()] == (["squeue"] if sacct is None else ["squeue", "sacct"])


def test_find_without_squeue_is_a_lookup_failure(fakes):
    with pytest.raises(LookupFailed, match="squeue could not be asked .*squeue is not installed here"):
        Slurm().find("x", "t", env={"PATH": str(fakes.bin / "none")})


def test_submit_retry_stops_when_the_lookup_fails(fakes, job_script):
    # A timed-out sbatch may have queued the job; when squeue cannot say, nothing is submitted again.
    fakes.add("sbatch", {"sleep": 5, "stdout": "1\n"})
    fakes.add("squeue", {"rc": 1, "stderr": "squeue: error: Unable to contact slurm controller"})
    with pytest.raises(RetriesExhausted, match=r"whether that queued a job is unknown: squeue failed"):
        submit_with_retry(Slurm(timeout=0.5), job_script, cwd=job_script.parent, env=fakes.env,
                          attempts=3, base_delay=0, sleep=lambda d: None, job_name="j", token="t")
    assert [c[0] for c in fakes.calls()] == ["sbatch", "squeue"]


def test_squeue_status_and_array_aggregation(fakes):
    fakes.add("squeue", {"stdout": "\n".join([
        "300|PENDING|PartitionNodeLimit",
        "301|RUNNING|None",
        "302_0|COMPLETED|None",
        "302_1|RUNNING|None",
        "302_[2-3]|PENDING|JobArrayTaskLimit",
        "303_0|COMPLETED|None",
        "303_1|FAILED|NonZeroExitCode",
        "303_2|TIMEOUT|TimeLimit",
        "304_0|COMPLETED|None",
        "304_1|COMPLETED|None",
        "305_[0-3]|PENDING|Priority",
        "306|CANCELLED|None",
    ]) + "\n"})
    fakes.add("sacct", {"rc": 1, "stderr": "sacct: error: Slurm accounting storage is disabled\n"})
    ids = ["300", "301", "302", "303", "304", "305", "306"]
    st = Slurm().status(ids, env=fakes.env)
    assert st["300"] == JobState("pending", reason="PartitionNodeLimit", source="squeue")
    assert st["301"].state == "running" and st["301"].reason == "RUNNING"
    assert st["302"].state == "running"
    assert st["303"].state == "failed" and st["303"].reason == "NonZeroExitCode"
    assert st["304"].state == "completed"
    assert st["305"].state == "pending"
    assert st["306"].state == "cancelled"
    assert fakes.calls() == [["squeue", "-h", "-t", "all", "-j", ",".join(ids),
                              "-o", "%i|%T|%r"]]


def test_squeue_invalid_job_id_and_sacct_disabled(fakes):
    fakes.add("squeue", {"rc": 1, "stderr": "slurm_load_jobs error: Invalid job id specified\n"})
    fakes.add("sacct", {"rc": 1, "stderr": "sacct: error: Slurm accounting storage is disabled\n"})
    st = Slurm().status(["400", "401"], env=fakes.env)
    assert st == {"400": JobState("unknown"), "401": JobState("unknown")}
    assert fakes.calls("sacct") == [["sacct", "-n", "-P", "-X", "-j", "400,401",
                                     "-o", "JobID,State,ExitCode"]]


def test_sacct_fills_in_what_squeue_forgot(fakes):
    fakes.add("squeue", {"stdout": "500|RUNNING|None\n"})
    fakes.add("sacct", {"stdout": "501|FAILED|1:0\n502|CANCELLED by 0|0:15\n503_0|COMPLETED|0:0\n"
                                  "503_1|COMPLETED|0:0\n504|TIMEOUT|0:0\n"})
    st = Slurm().status(["500", "501", "502", "503", "504", "505"], env=fakes.env)
    assert st["500"].state == "running"
    assert st["501"] == JobState("failed", exit_code=1, reason="FAILED", source="sacct")
    assert st["502"].state == "cancelled" and st["502"].reason == "CANCELLED by 0"
    assert st["503"] == JobState("completed", exit_code=0, reason="COMPLETED", source="sacct")
    assert st["504"].state == "timeout"
    assert st["505"] == JobState("unknown")
    assert fakes.calls("sacct")[0][5] == "501,502,503,504,505"


def test_squeue_other_failure_is_transient(fakes):
    fakes.add("squeue", {"rc": 1, "stderr": "squeue: error: Unable to contact slurm controller "
                                            "(connect failure)\n"})
    with pytest.raises(TransientError, match="Unable to contact"):
        Slurm().status(["1"], env=fakes.env)


# -- Slurm checker ------------------------------------------------------------------------------

def slurm_check(old="", new=""):
    text = SLURM_OK.replace(old, new) if old else SLURM_OK
    assert old == "" or text != SLURM_OK, f"{old!r} not in the template"
    return Slurm().check(text)


def test_slurm_check_passes():
    assert slurm_check() == []
    assert slurm_check("#SBATCH --time=01:00:00", "#SBATCH -t 2-12:30") == []
    assert slurm_check("exec srun --mpi=pmix --cpus-per-task=$SLURM_CPUS_PER_TASK",
                       "OMP_NUM_THREADS=20 srun -c 20") == []


@pytest.mark.parametrize("old,new,rule", [
    ("#!/bin/bash\n", "", "[shebang]"),
    ("#SBATCH --exclusive", "#SBATCH --exclusive\n#PBS -l walltime=01:00:00", "[no-pbs]"),
    ("export OMP_NUM_THREADS=20", "export OMP_NUM_THREADS=20\n#SBATCH --qos=debug",
     "[directives-first]"),
    ("#SBATCH --nodes=2\n", "", "[nodes-with-ntasks-per-node]"),
    ("#SBATCH --exclusive", "#SBATCH --exclusive --cpu-bind=cores", "[cpu-bind-in-sbatch]"),
    ("--cpus-per-task=$SLURM_CPUS_PER_TASK ", "", "[srun-cpus-per-task]"),
    ("--cpu-bind=cores ", "", "[srun-cpu-bind]"),
    ("--time=01:00:00", "--time=1:75:00", "[time-format]"),
    ("--time=01:00:00", "--time=1h", "[time-format]"),
    ("#SBATCH --job-name=scal_n0002\n", "", "[job-name]"),
])
def test_slurm_check_rules(old, new, rule):
    problems = slurm_check(old, new)
    assert problems and all(p.startswith(rule) for p in problems), problems


def test_slurm_check_names_the_line():
    problems = slurm_check("export OMP_NUM_THREADS=20", "export OMP_NUM_THREADS=20\n#SBATCH -p x")
    assert problems == [problems[0]] and "line 11" in problems[0] and "line 10" in problems[0]
    # A program's own -c is not srun's --cpus-per-task.
    assert slurm_check("--cpus-per-task=$SLURM_CPUS_PER_TASK ", "")[0].endswith("explicitly")
    assert "line 11" in slurm_check("--cpu-bind=cores ", "")[0]
