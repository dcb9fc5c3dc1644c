"""Scheduler backends (knl_train.studies.schedulers) against FAKE scheduler commands.

The fakes are small executables written into tmp_path and put alone on PATH (the env passed to
the backend calls). They replay recorded or modelled output and log their argv, so the tests
check both our parsing and the exact command lines. No PBS server can exist here (reference
§3.6); the qstat JSON fixture is modelled on the documented OpenPBS format (see
tests/fixtures/schedulers/README.md). A real Slurm is exercised by other tests; these cover the
parsing, retry and checker logic only.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from knl_train.errors import UserError
from knl_train.studies import schedulers
from knl_train.studies.schedulers import JobState, TransientError, submit_with_retry
from knl_train.studies.schedulers.pbs import Pbs, parse_select
from knl_train.studies.schedulers.slurm import Slurm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "schedulers"

REPLAY = """\
#!{python}
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
name = os.path.basename(sys.argv[0])
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": [name] + sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
responses = json.load(open(os.path.join(here, name + ".json")))
counter = os.path.join(here, name + ".count")
n = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(n + 1))
r = responses[min(n, len(responses) - 1)]
time.sleep(r.get("sleep", 0))
sys.stdout.write(r.get("stdout", ""))
sys.stderr.write(r.get("stderr", ""))
sys.exit(r.get("rc", 0))
"""

# Prints the requested jobs of the fixture; unknown ids go to stderr with exit 153. With
# qstat.mode = "nothing", any unknown id suppresses the JSON (the worst case for batching).
FAKE_QSTAT = """\
#!{python}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": ["qstat"] + sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
data = json.load(open({fixture!r}))
ids = [a for a in sys.argv[1:] if not a.startswith("-") and a != "json"]
mode_file = os.path.join(here, "qstat.mode")
mode = open(mode_file).read().strip() if os.path.exists(mode_file) else "partial"
jobs = {{i: data["Jobs"][i] for i in ids if i in data["Jobs"]}}
unknown = [i for i in ids if i not in data["Jobs"]]
for i in unknown:
    sys.stderr.write("qstat: Unknown Job Id " + i + "\\n")
if jobs and not (unknown and mode == "nothing"):
    out = {{k: data[k] for k in ("timestamp", "pbs_version", "pbs_server")}}
    out["Jobs"] = jobs
    sys.stdout.write(json.dumps(out, indent=4) + "\\n")
sys.exit(153 if unknown else 0)
"""


class Fakes:
    """A bin directory of fake commands and the log of their calls."""

    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.bin.mkdir()
        self.env = {"PATH": str(self.bin)}

    def add(self, name, *responses):
        """A command replaying ``responses`` (stdout, stderr, rc, sleep); the last one repeats."""
        (self.bin / f"{name}.json").write_text(json.dumps(list(responses)))
        self._write(name, REPLAY.format(python=sys.executable))

    def add_qstat(self, mode="partial"):
        self._write("qstat", FAKE_QSTAT.format(python=sys.executable,
                                               fixture=str(FIXTURES / "qstat_xf_json.json")))
        (self.bin / "qstat.mode").write_text(mode)

    def _write(self, name, text):
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def calls(self, name=None):
        log = self.bin / "calls.jsonl"
        if not log.exists():
            return []
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return [c["argv"] for c in calls if name is None or c["argv"][0] == name]


@pytest.fixture()
def fakes(tmp_path):
    return Fakes(tmp_path)


@pytest.fixture()
def script(tmp_path):
    point = tmp_path / "points" / "n0001"
    point.mkdir(parents=True)
    path = point / "job.sbatch"
    path.write_text("#!/bin/bash\n")
    return path


# -- registry and JobState ----------------------------------------------------------------------

def test_registry_and_unknown_name():
    assert isinstance(schedulers.get("slurm"), Slurm)
    assert isinstance(schedulers.get("PBS"), Pbs)
    with pytest.raises(UserError, match="pbs, slurm"):
        schedulers.get("lsf")
    slurm, pbs = Slurm(), Pbs()
    assert (slurm.script_name, slurm.directive) == ("job.sbatch", "#SBATCH")
    assert (pbs.script_name, pbs.directive) == ("job.pbs", "#PBS")


def test_job_state_finished():
    assert JobState("timeout").finished and not JobState("running").finished
    assert not JobState("unknown").finished
    with pytest.raises(ValueError):
        JobState("done")


# -- Slurm submit -------------------------------------------------------------------------------

def test_sbatch_parsable_with_cluster(fakes, script):
    fakes.add("sbatch", {"stdout": "123;cluster\n"})
    job_id = Slurm().submit(script, cwd=script.parent, env=fakes.env)
    assert job_id == "123"
    assert fakes.calls("sbatch") == [["sbatch", "--parsable", str(script)]]
    log = json.loads((fakes.bin / "calls.jsonl").read_text().splitlines()[0])
    assert log["cwd"] == str(script.parent)


def test_sbatch_dependency(fakes, script):
    fakes.add("sbatch", {"stdout": "124\n"})
    assert Slurm().submit(script, cwd=script.parent, after="123", env=fakes.env) == "124"
    assert fakes.calls("sbatch") == [
        ["sbatch", "--parsable", "--dependency=afterany:123", str(script)]]


def test_sbatch_transient_twice_then_success(fakes, script, capsys):
    busy = {"rc": 1, "stderr": "sbatch: error: Batch job submission failed: Socket timed out "
                                "on send/recv operation\n"}
    fakes.add("sbatch", busy, {"rc": 1, "stderr": "sbatch: error: Slurm temporarily unable to "
                                                  "accept job, sleeping and retrying\n"
                                                  "sbatch: error: Batch job submission failed: "
                                                  "Resource temporarily unavailable\n"},
              {"stdout": "125\n"})
    sleeps = []
    job_id = submit_with_retry(Slurm(), script, cwd=script.parent, env=fakes.env,
                               base_delay=2.0, sleep=sleeps.append)
    assert job_id == "125"
    assert len(fakes.calls("sbatch")) == 3
    assert sleeps == [2.0, 4.0]
    # Retries are logged as warnings (a message may run over several lines).
    logged = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("knl-train: warning: ")]
    assert len(logged) == 2 and "Socket timed out" in logged[0]
    assert all(line.startswith(f"knl-train: warning: sbatch {script}: ") for line in logged)


def test_retry_delays_are_capped_and_exhaustion_is_a_user_error(fakes, script):
    fakes.add("sbatch", {"rc": 1, "stderr": "sbatch: error: Batch job submission failed: "
                                            "Job violates accounting/QOS policy (job submit "
                                            "limit, user's size and/or time limits) "
                                            "QOSMaxSubmitJobPerUserLimit\n"})
    sleeps = []
    with pytest.raises(UserError) as err:
        submit_with_retry(Slurm(), script, cwd=script.parent, env=fakes.env, attempts=4,
                          base_delay=3.0, max_delay=8.0, sleep=sleeps.append)
    assert sleeps == [3.0, 6.0, 8.0]
    msg = str(err.value)
    assert str(script) in msg and "4 times" in msg and "QOSMaxSubmitJobPerUserLimit" in msg


def test_retry_finds_a_job_the_timed_out_submit_queued(fakes, script):
    fakes.add("sbatch", {"rc": 1, "stderr": "sbatch: error: slurm_receive_msg: Socket timed "
                                            "out on send/recv operation\n"})
    fakes.add("squeue", {"stdout": "130|other-token\n131|tok-1\n"})
    job_id = submit_with_retry(Slurm(), script, cwd=script.parent, env=fakes.env,
                               sleep=lambda s: None, job_name="scal_n0001", token="tok-1")
    assert job_id == "131"
    assert len(fakes.calls("sbatch")) == 1


def test_sbatch_permanent_error(fakes, script):
    fakes.add("sbatch", {"rc": 1, "stderr": "sbatch: error: Batch job submission failed: "
                                            "Invalid account or account/partition "
                                            "combination specified\n"})
    sleeps = []
    with pytest.raises(UserError) as err:
        submit_with_retry(Slurm(), script, cwd=script.parent, env=fakes.env,
                          sleep=sleeps.append)
    assert "Invalid account or account/partition combination specified" in str(err.value)
    assert str(script) in str(err.value)
    assert sleeps == [] and len(fakes.calls("sbatch")) == 1


def test_sbatch_prints_no_job_id(fakes, script):
    fakes.add("sbatch", {"stdout": "Submitted batch job\n"})
    with pytest.raises(UserError, match="Submitted batch job"):
        Slurm().submit(script, cwd=script.parent, env=fakes.env)


def test_sbatch_not_installed(fakes, script):
    with pytest.raises(UserError, match="sbatch is not installed"):
        Slurm().submit(script, cwd=script.parent, env=fakes.env)


def test_submit_timeout_is_transient(fakes, script):
    fakes.add("sbatch", {"sleep": 5, "stdout": "1\n"})
    with pytest.raises(TransientError, match="did not answer"):
        Slurm(timeout=0.5).submit(script, cwd=script.parent, env=fakes.env)


# -- Slurm find / status ------------------------------------------------------------------------

def test_squeue_find_by_comment(fakes):
    fakes.add("squeue", {"stdout": "200|tok-a\n201_[0-3]|tok-b\n"})
    slurm = Slurm()
    assert slurm.find("scal_n0001", "tok-b", env=fakes.env) == "201"
    assert slurm.find("scal_n0001", "tok-z", env=fakes.env) is None
    assert fakes.calls("squeue")[0] == ["squeue", "-h", "-t", "all", "--name=scal_n0001",
                                        "-o", "%i|%k"]


def test_squeue_find_failure_is_none(fakes):
    fakes.add("squeue", {"rc": 1, "stderr": "squeue: error: Unable to contact slurm controller"})
    assert Slurm().find("x", "t", env=fakes.env) is None
    assert Slurm().find("x", "t", env={"PATH": str(fakes.bin / "none")}) is None


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


def test_status_of_nothing_runs_nothing(fakes):
    assert Slurm().status([], env=fakes.env) == {} and Pbs().status([], env=fakes.env) == {}
    assert fakes.calls() == []


# -- PBS submit / status ------------------------------------------------------------------------

def test_qsub_keeps_the_whole_id(fakes, script):
    fakes.add("qsub", {"stdout": "1234.pbs01\n"})
    pbs = Pbs()
    assert pbs.submit(script, cwd=script.parent, env=fakes.env) == "1234.pbs01"
    assert pbs.submit(script, cwd=script.parent, after="1234.pbs01", env=fakes.env) == "1234.pbs01"
    assert fakes.calls("qsub") == [["qsub", str(script)],
                                   ["qsub", "-W", "depend=afterany:1234.pbs01", str(script)]]


def test_qsub_transient_and_permanent(fakes, script):
    fakes.add("qsub", {"rc": 15034, "stderr": "qsub: Maximum number of jobs already in queue "
                                              "for user MSG=total number of jobs in queue "
                                              "exceeds the queue limit\n"},
              {"rc": 1, "stderr": "qsub: Unknown queue\n"})
    with pytest.raises(TransientError, match="Maximum number of jobs"):
        Pbs().submit(script, cwd=script.parent, env=fakes.env)
    with pytest.raises(UserError, match="qsub: Unknown queue"):
        Pbs().submit(script, cwd=script.parent, env=fakes.env)


def test_qsub_prints_no_job_id(fakes, script):
    fakes.add("qsub", {"stdout": "\n", "stderr": "qsub: warning: odd\n"})
    with pytest.raises(UserError, match=r"qsub accepted .* but printed no job id: 'qsub: warning: "
                                        r"odd'; check the job with qstat"):
        Pbs().submit(script, cwd=script.parent, env=fakes.env)


@pytest.mark.parametrize("backend, stdout, job_id", [
    (Slurm(), "123\n", "123"), (Slurm(), "sbatch: note\n124;cluster\n", "124"), (Slurm(), "", None),
    (Slurm(), "Submitted batch job 5\n", None), (Pbs(), "1234.pbs01\n", "1234.pbs01"),
    (Pbs(), "77[].pbs01\n", "77[].pbs01"), (Pbs(), "", None), (Pbs(), "qsub: error\n", None)])
def test_parse_job_id(backend, stdout, job_id):
    assert backend.parse_job_id(stdout) == job_id


def test_submit_argv(tmp_path):
    script = tmp_path / "job"
    assert Slurm().submit_argv(script, None) == ["sbatch", "--parsable", str(script)]
    assert Pbs().submit_argv(script, "9.s") == ["qsub", "-W", "depend=afterany:9.s", str(script)]


def test_pbs_find_is_unsupported(fakes):
    assert Pbs().find("scal_n0001", "tok", env=fakes.env) is None


def test_qstat_json_states(fakes):
    fakes.add_qstat()
    ids = ["1001.pbs01", "1002.pbs01", "1003.pbs01", "1004.pbs01", "1005.pbs01", "1006.pbs01",
           "1007.pbs01", "1008.pbs01", "1234[].pbs01", "1235[].pbs01"]
    st = Pbs().status(ids, env=fakes.env)
    assert fakes.calls("qstat") == [["qstat", "-x", "-f", "-F", "json", *ids]]
    assert st["1001.pbs01"].state == "pending"
    assert "Insufficient amount of resource: ncpus" in st["1001.pbs01"].reason
    assert st["1002.pbs01"].state == "running"
    assert st["1003.pbs01"].state == "completed" and st["1003.pbs01"].exit_code == 0
    assert st["1004.pbs01"].state == "failed" and st["1004.pbs01"].exit_code == 1
    assert st["1004.pbs01"].reason.startswith("F (Exit_status 1)")
    assert st["1005.pbs01"].state == "timeout" and st["1005.pbs01"].exit_code == -29
    assert st["1006.pbs01"].state == "timeout"
    assert st["1007.pbs01"].state == "cancelled" and "signal 15" in st["1007.pbs01"].reason
    assert st["1008.pbs01"].state == "cancelled" and st["1008.pbs01"].exit_code is None
    assert st["1234[].pbs01"].state == "running"
    assert st["1235[].pbs01"].state == "failed"
    assert all(s.source == "qstat" for s in st.values())


def test_qstat_unknown_ids(fakes):
    fakes.add_qstat("partial")
    st = Pbs().status(["1003.pbs01", "9999.pbs01"], env=fakes.env)
    assert st["1003.pbs01"].state == "completed"
    assert st["9999.pbs01"] == JobState("unknown")
    assert len(fakes.calls("qstat")) == 1


def test_qstat_unknown_id_spoils_batch(fakes):
    fakes.add_qstat("nothing")
    st = Pbs().status(["1003.pbs01", "9999.pbs01", "1002.pbs01"], env=fakes.env)
    assert st["1003.pbs01"].state == "completed" and st["1002.pbs01"].state == "running"
    assert st["9999.pbs01"] == JobState("unknown")
    # The batch, then one call per id the error message did not name.
    assert fakes.calls("qstat")[1:] == [["qstat", "-x", "-f", "-F", "json", "1003.pbs01"],
                                        ["qstat", "-x", "-f", "-F", "json", "1002.pbs01"]]


def test_qstat_server_down_is_transient(fakes):
    fakes.add("qstat", {"rc": 15010, "stderr": "Connection refused\nqstat: cannot connect to "
                                               "server pbs01 (errno=111)\n"})
    with pytest.raises(TransientError, match="cannot connect"):
        Pbs().status(["1.pbs01", "2.pbs01"], env=fakes.env)


def test_qstat_long_server_name_matches(fakes):
    fakes.add("qstat", {"stdout": json.dumps({"Jobs": {"77.pbs01.example.org": {
        "job_state": "F", "Exit_status": 0}}})})
    assert Pbs().status(["77.pbs01"], env=fakes.env)["77.pbs01"].state == "completed"


# -- Slurm checker ------------------------------------------------------------------------------

SLURM_OK = textwrap.dedent("""\
    #!/bin/bash
    #SBATCH --job-name=scal_n0002
    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=2
    #SBATCH --cpus-per-task=20
    #SBATCH --exclusive
    #SBATCH --time=01:00:00
    #SBATCH --comment=tok-1

    export OMP_NUM_THREADS=20
    exec srun --mpi=pmix --cpus-per-task=$SLURM_CPUS_PER_TASK \\
        --cpu-bind=cores python -c 'print(1)'
    """)


def slurm_check(old="", new=""):
    text = SLURM_OK.replace(old, new) if old else SLURM_OK
    assert old == "" or text != SLURM_OK, f"{old!r} not in the template"
    return Slurm().check(text)


def test_detect_and_check_script(tmp_path):
    assert schedulers.detect(SLURM_OK) == "slurm" and schedulers.detect("#!/bin/bash\n#PBS -N x\n") == "pbs"
    path = tmp_path / "job.sbatch"
    path.write_text(SLURM_OK)
    assert schedulers.check_script(path) == ("slurm", [])
    kind, problems = schedulers.check_script(path, "pbs")
    assert kind == "pbs" and any(p.startswith("[no-sbatch]") for p in problems)
    with pytest.raises(UserError, match="cannot read"):
        schedulers.check_script(tmp_path / "missing")


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


# -- PBS checker --------------------------------------------------------------------------------

PBS_OK = textwrap.dedent("""\
    #!/bin/bash
    #PBS -N scal_n0002
    #PBS -l select=2:ncpus=40:mpiprocs=2:ompthreads=20
    #PBS -l place=scatter:excl
    #PBS -l walltime=01:00:00
    #PBS -q workq -A proj01
    #PBS -j oe

    cd "$PBS_O_WORKDIR"
    export OMP_NUM_THREADS=20
    mpiexec -n 4 --ppn 2 knl-train train --config train.yaml
    """)


def pbs_check(old="", new=""):
    text = PBS_OK.replace(old, new) if old else PBS_OK
    assert old == "" or text != PBS_OK, f"{old!r} not in the template"
    return Pbs().check(text)


def test_parse_select():
    assert parse_select("2:ncpus=40:mpiprocs=2:ompthreads=20+1:ncpus=4") == [
        {"count": "2", "ncpus": "40", "mpiprocs": "2", "ompthreads": "20"},
        {"count": "1", "ncpus": "4"}]
    assert parse_select("select=ncpus=8") == [{"count": "1", "ncpus": "8"}]
    for bad in ("2:ncpus=4+", "2::ncpus=4", "2:ncpus", "2:ncpus=4:ncpus=8"):
        with pytest.raises(ValueError):
            parse_select(bad)


def test_pbs_check_passes():
    assert pbs_check() == []
    for old, new in [
        ('cd "$PBS_O_WORKDIR"', "cd $PBS_O_WORKDIR"),
        ('cd "$PBS_O_WORKDIR"', 'cd "${PBS_O_WORKDIR}" || exit 1'),
        ("#PBS -j oe", "#PBS -j oe\n#PBS -J 0-4:2%2"),
        ("place=scatter:excl", "place=vscatter:exclhost:group=switch"),
        ("walltime=01:00:00", "walltime=3600"),
        ("ompthreads=20", "ompthreads=20:mem=180gb:site_flag=ib"),
        ("#PBS -l select=2:ncpus=40:mpiprocs=2:ompthreads=20\n#PBS -l place=scatter:excl\n",
         "#PBS -l select=2:ncpus=20:mpiprocs=1,place=pack\n"),
    ]:
        assert pbs_check(old, new) == [], (old, new)


@pytest.mark.parametrize("old,new,rule", [
    ("#!/bin/bash\n", "", "[shebang]"),
    ("#PBS -j oe", "#PBS -j oe\n#SBATCH --exclusive", "[no-sbatch]"),
    ('export OMP_NUM_THREADS=20', 'export OMP_NUM_THREADS=20\n#PBS -m abe', "[directives-first]"),
    ("-N scal_n0002", "-N scal_n0002_stron", "[job-name]"),      # 16 characters
    ("-N scal_n0002", "-N 9abc", "[job-name]"),
    ("-N scal_n0002", "-N 'scal n2'", "[job-name]"),
    ("#PBS -l select=2:ncpus=40:mpiprocs=2:ompthreads=20\n", "", "[select]"),
    ("#PBS -j oe", "#PBS -j oe\n#PBS -l select=1:ncpus=4", "[select]"),
    ("ompthreads=20", "ompthreads=10", "[select]"),
    (":ompthreads=20", "", "[select]"),                            # ompthreads defaults to ncpus
    ("select=2:", "select=0:", "[select]"),
    ("select=2:", "select=two:", "[select]"),
    ("ncpus=40", "ncpus=4O", "[select]"),
    ("ompthreads=20", "ompthreads=20:walltime=1:00:00", "[select]"),
    ("ompthreads=20", "ompthreads=20:mem.size=4gb", "[select]"),
    ("place=scatter:excl", "place=spread:excl", "[place]"),
    ("place=scatter:excl", "place=scatter:pack", "[place]"),
    ("walltime=01:00:00", "walltime=1h", "[walltime]"),
    ("walltime=01:00:00", "walltime=01:60:00", "[walltime]"),
    ("#PBS -j oe", "#PBS -j oe\n#PBS -l cput=01:00:00", "[no-cput]"),
    ('cd "$PBS_O_WORKDIR"\n', "", "[cd-workdir]"),
    ('cd "$PBS_O_WORKDIR"\n', "cd /tmp\n", "[cd-workdir]"),
    ("#PBS -j oe", "#PBS -j oe\n#PBS -J 0-0", "[array]"),
    ("#PBS -j oe", "#PBS -j oe\n#PBS -J 0-4:5", "[array]"),
    ("#PBS -j oe", "#PBS -j oe\n#PBS -J 0,1,2", "[array]"),
])
def test_pbs_check_rules(old, new, rule):
    problems = pbs_check(old, new)
    assert problems and all(p.startswith(rule) for p in problems), problems


def test_pbs_check_cd_after_launcher_and_messages():
    text = PBS_OK.replace('cd "$PBS_O_WORKDIR"\n', "") + 'cd "$PBS_O_WORKDIR"\n'
    problems = Pbs().check(text)
    assert len(problems) == 1 and "line 10" in problems[0] and "mpiexec" in problems[0]
    msg = pbs_check("ompthreads=20", "ompthreads=10")[0]
    assert "line 3" in msg and "ncpus=40 != mpiprocs=2 x ompthreads=10" in msg
    assert "16 characters" in pbs_check("-N scal_n0002", "-N scal_n0002_stron")[0]
