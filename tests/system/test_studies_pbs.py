"""A PBS Pro study without a PBS server (none can be installed here: jobs_and_schedulers.md 3.6).

What is real: the rendered script, run by bash with the variables a PBS MOM sets
(PBS_O_WORKDIR, PBS_JOBID, PBS_NODEFILE with a host line per mpiprocs) and starting in $HOME
as PBS does; mpirun on $PBS_NODEFILE; the ranks' training. What is faked: qsub and qstat,
small scripts that answer as OpenPBS documents (qsub prints the job id; qstat -x -f -F json).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import FIXTURES, clean_env, run_cli

pytestmark = pytest.mark.mpi  # the job script runs mpirun with 2 ranks

STUDIES = FIXTURES / "studies"
HOSTILE = 'a"; rm -rf ~; "'


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_pbs_script_runs_the_training_through_a_real_shell(tmp_path):
    spec = tmp_path / "pbs.yaml"
    spec.write_text(json.dumps({
        "name": HOSTILE, "site": str(STUDIES / "ci-pbs.yaml"), "nodes": [1], "ranks_per_node": 2,
        "scaling": "weak", "per_rank_batch": 8, "train": {"config": str(STUDIES / "tiny.yaml")},
        "steps": 3, "warmup_steps": 1, "walltime": "00:05:00"}))
    out = tmp_path / "study"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = clean_env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    _fake(bin_dir, "qsub", f'echo "$PWD $*" >> {tmp_path}/qsub.log\necho 4242.pbs-test\n')
    proc = run_cli("study", "render", spec, "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    script = out / "points" / "n0001" / "job.pbs"
    text = script.read_text()
    assert re.search(r"^#PBS -l select=1:ncpus=(\d+):mpiprocs=2:ompthreads=(\d+)$", text, re.M)
    assert '--hostfile "$PBS_NODEFILE"' in text

    proc = run_cli("study", "submit", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "qsub.log").read_text().split() == [str(script.parent), str(script)]

    # As a MOM would: start in $HOME (with a canary the hostile name must not touch).
    home = tmp_path / "home"
    home.mkdir()
    (home / "canary").write_text("still here")
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    job_env = {**env, "HOME": str(home), "PBS_O_WORKDIR": str(script.parent), "PBS_JOBID": "4242.pbs-test",
               "PBS_NODEFILE": str(nodefile), "PBS_JOBNAME": "x", "PBS_ENVIRONMENT": "PBS_BATCH"}
    run = subprocess.run(["bash", str(script)], cwd=home, env=job_env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (home / "canary").read_text() == "still here"
    summary = json.loads((script.parent / "run-0" / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["steps"]) == (2, 16, 3)
    record = json.loads((script.parent / "job-4242.json").read_text())
    assert (record["job_id"], record["state"], record["exit_code"], record["nodelist"]) == \
        ("4242.pbs-test", "finished", 0, "localhost")

    # qstat -x -F json, as OpenPBS prints a finished job.
    answer = {"Jobs": {"4242.pbs-test": {"job_state": "F", "Exit_status": 0, "Job_Name": "a_rm_rf_n1"}}}
    _fake(bin_dir, "qstat", f"echo \"$*\" >> {tmp_path}/qstat.log\ncat <<'JSON'\n{json.dumps(answer)}\nJSON\n")
    rows = json.loads(run_cli("study", "status", out, "--json", env=env).stdout)
    assert [(r["job_id"], r["state"], r["exit_code"], r["source"], r["runs_done"]) for r in rows] == \
        [("4242.pbs-test", "completed", 0, "qstat", 1)]
    assert "-x" in (tmp_path / "qstat.log").read_text() and "json" in (tmp_path / "qstat.log").read_text()
    proc = run_cli("study", "report", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report" / "scaling.csv").read_text().splitlines()[1].startswith("1,2,16,")
    assert os.path.exists(out / "report" / "scaling.png")
