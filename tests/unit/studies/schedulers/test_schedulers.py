"""What the scheduler backends share (knl_train/studies/schedulers/__init__.py): the registry,
JobState, submit with retries, job ids, and which checker a script needs.

Submissions go to FAKE scheduler commands (tests/support/schedulers.py): small executables put
alone on PATH (the env passed to the backend calls) that replay recorded or modelled output and
log their argv. A real Slurm is exercised by tests/system; these cover the parsing, retry and
checker logic only.
"""

from __future__ import annotations

import pytest

from knl_train.errors import UserError
from knl_train.studies import schedulers
from knl_train.studies.schedulers import JobState, submit_with_retry
from knl_train.studies.schedulers.pbs import Pbs
from knl_train.studies.schedulers.slurm import Slurm
from tests.support.schedulers import SLURM_OK


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


def test_retry_delays_are_capped_and_exhaustion_is_a_user_error(fakes, job_script):
    fakes.add("sbatch", {"rc": 1, "stderr": "sbatch: error: Batch job submission failed: "
                                            "Job violates accounting/QOS policy (job submit "
                                            "limit, user's size and/or time limits) "
                                            "QOSMaxSubmitJobPerUserLimit\n"})
    sleeps = []
    with pytest.raises(UserError) as err:
        submit_with_retry(Slurm(), job_script, cwd=job_script.parent, env=fakes.env, attempts=4,
                          base_delay=3.0, max_delay=8.0, sleep=sleeps.append)
    assert sleeps == [3.0, 6.0, 8.0]
    msg = str(err.value)
    assert str(job_script) in msg and "4 times" in msg and "QOSMaxSubmitJobPerUserLimit" in msg


def test_retry_finds_a_job_the_timed_out_submit_queued(fakes, job_script):
    fakes.add("sbatch", {"rc": 1, "stderr": "sbatch: error: slurm_receive_msg: Socket timed "
                                            "out on send/recv operation\n"})
    fakes.add("squeue", {"stdout": "130|other-token\n131|tok-1\n"})
    job_id = submit_with_retry(Slurm(), job_script, cwd=job_script.parent, env=fakes.env,
                               sleep=lambda s: None, job_name="scal_n0001", token="tok-1")
    assert job_id == "131"
    assert len(fakes.calls("sbatch")) == 1


def test_status_of_nothing_runs_nothing(fakes):
    assert Slurm().status([], env=fakes.env) == {} and Pbs().status([], env=fakes.env) == {}
    assert fakes.calls() == []


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


# -- the checkers: which one a script needs ----------------------------------------------------

def test_detect_and_check_script(tmp_path):
    assert schedulers.detect(SLURM_OK) == "slurm" and schedulers.detect("#!/bin/bash\n#PBS -N x\n") == "pbs"
    path = tmp_path / "job.sbatch"
    path.write_text(SLURM_OK)
    assert schedulers.check_script(path) == ("slurm", [])
    kind, problems = schedulers.check_script(path, "pbs")
    assert kind == "pbs" and any(p.startswith("[no-sbatch]") for p in problems)
    with pytest.raises(UserError, match="cannot read"):
        schedulers.check_script(tmp_path / "missing")


# ---- requeueing, as the site allows ------------------------------------------------------------
@pytest.mark.parametrize("site, allowed, line", [
    ("ci-slurm", None, "#SBATCH --no-requeue"), ("ci-slurm", True, "#SBATCH --requeue"),
    ("ci-slurm", False, "#SBATCH --no-requeue"),
    ("ci-pbs", None, "#PBS -r n"), ("ci-pbs", True, "#PBS -r y"),
])
def test_scripts_request_requeueing_only_where_the_site_allows_it(tmp_path, site, allowed, line):
    # Slurm (JobRequeue=1) and PBS (-r y) requeue by default: unless the site allows it, the
    # script says no, so a lost node ends the job where `study submit --retry-failed` sees it.
    from knl_train.studies import render, spec
    from tests.support import FIXTURES
    text = (FIXTURES / "studies" / f"{site}.yaml").read_text()
    (tmp_path / "site.yaml").write_text(text + ("" if allowed is None else f"requeue: {str(allowed).lower()}\n"))
    (tmp_path / "s.yaml").write_text(
        f"name: rq\nsite: {tmp_path / 'site.yaml'}\nnodes: [1]\nranks_per_node: 1\nscaling: weak\n"
        f"per_rank_batch: 8\ntrain: {{config: {FIXTURES / 'studies' / 'tiny.yaml'}}}\nsteps: 3\n")
    files = render.render(spec.load(tmp_path / "s.yaml")).files
    script = next(v for k, v in files.items() if k.startswith("points/n0001/job."))
    directives = [ln for ln in script.splitlines() if ln.startswith(("#SBATCH", "#PBS"))]
    assert [ln for ln in directives if "requeue" in ln or ln.startswith("#PBS -r")] == [line]
    assert schedulers.get("pbs" if site == "ci-pbs" else "slurm").check(script) == []
