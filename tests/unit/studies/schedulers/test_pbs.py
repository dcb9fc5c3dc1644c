"""The PBS backend (knl_train/studies/schedulers/pbs.py) against FAKE qsub and qstat
(tests/support/schedulers.py): no PBS server can exist here (reference §3.6), so qstat answers
from a fixture modelled on the documented OpenPBS JSON; and the script checker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knl_train.errors import UserError
from knl_train.studies.schedulers import JobState, LookupFailed, TransientError
from knl_train.studies.schedulers.pbs import Pbs, parse_select
from tests.support.schedulers import PBS_OK


def test_qsub_keeps_the_whole_id(fakes, job_script):
    fakes.add("qsub", {"stdout": "1234.pbs01\n"})
    pbs = Pbs()
    assert pbs.submit(job_script, cwd=job_script.parent, env=fakes.env) == "1234.pbs01"
    assert pbs.submit(job_script, cwd=job_script.parent, after="1234.pbs01", env=fakes.env) == "1234.pbs01"
    assert fakes.calls("qsub") == [["qsub", str(job_script)],
                                   ["qsub", "-W", "depend=afterany:1234.pbs01", str(job_script)]]


def test_qsub_transient_and_permanent(fakes, job_script):
    fakes.add("qsub", {"rc": 15034, "stderr": "qsub: Maximum number of jobs already in queue "
                                              "for user MSG=total number of jobs in queue "
                                              "exceeds the queue limit\n"},
              {"rc": 1, "stderr": "qsub: Unknown queue\n"})
    with pytest.raises(TransientError, match="Maximum number of jobs"):
        Pbs().submit(job_script, cwd=job_script.parent, env=fakes.env)
    with pytest.raises(UserError, match="qsub: Unknown queue"):
        Pbs().submit(job_script, cwd=job_script.parent, env=fakes.env)


def test_qsub_prints_no_job_id(fakes, job_script):
    fakes.add("qsub", {"stdout": "\n", "stderr": "qsub: warning: odd\n"})
    with pytest.raises(UserError, match=r"qsub accepted .* but printed no job id: 'qsub: warning: "
                                        r"odd'; check the job with qstat"):
        Pbs().submit(job_script, cwd=job_script.parent, env=fakes.env)


def _history(*jobs):
    """qstat -x -f -F json output listing ``(id, name, workdir)`` jobs."""
    return json.dumps({"pbs_version": "22.05", "Jobs": {
        i: {"Job_Name": name, "job_state": "F", "Variable_List": {"PBS_O_WORKDIR": wd, "PBS_O_HOME": "/h"}}
        for i, name, wd in jobs}})


def test_pbs_find_asks_qstat_history_by_name_and_directory(fakes):
    # PBS overwrites the comment, so the token cannot be read back: the point's directory tells.
    fakes.add("qstat", {"stdout": _history(("90.s1", "scal_n0001", "/s/points/n1"),
                                           ("95.s1", "scal_n0001", "/t/points/n1"),
                                           ("97.s1", "scal_n0002", "/s/points/n1"))})
    pbs = Pbs()
    assert pbs.find("scal_n0001", "tok", env=fakes.env, workdir=Path("/s/points/n1")) == "90.s1"
    assert fakes.calls() == [["qstat", "-x", "-f", "-F", "json"]]
    assert pbs.find("scal_n0001", "tok", env=fakes.env, workdir=Path("/s/points/n9")) is None
    assert pbs.find("scal_n0001", "tok", env=fakes.env, workdir=Path("/s/points/n1"),
                    exclude=("90.s1",)) is None
    # Without the directory a name (cut to 15 characters) says too little: none.
    assert pbs.find("scal_n0001", "tok", env=fakes.env) is None


def test_pbs_find_reads_a_text_variable_list(fakes):
    jobs = {"12.s1": {"Job_Name": "scal_n0001", "Variable_List": "PBS_O_HOME=/h,PBS_O_WORKDIR=/s/p"}}
    fakes.add("qstat", {"stdout": json.dumps({"Jobs": jobs})})
    assert Pbs().find("scal_n0001", "tok", env=fakes.env, workdir=Path("/s/p")) == "12.s1"


def test_pbs_find_failure_is_a_lookup_failure(fakes):
    fakes.add("qstat", {"rc": 2, "stderr": "Connection refused\nqstat: cannot connect to server s1 (errno=111)"})
    with pytest.raises(LookupFailed, match="qstat -x failed: Connection refused"):
        Pbs().find("scal_n0001", "tok", env=fakes.env, workdir=Path("/s/p"))


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


# -- PBS checker --------------------------------------------------------------------------------

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
